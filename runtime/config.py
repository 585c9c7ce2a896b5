"""`HybridConfig`: a teacher's architecture plus one mixer type per layer."""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PretrainedConfig

LAYER_TYPES = ("attention", "gdn", "gla")
LINEAR_TYPES = ("gdn", "gla")
TEACHER_FAMILIES = ("llama", "qwen2", "qwen3")


@strict
class HybridConfig(PretrainedConfig):
    """Config of a hybrid decoder: teacher fields + `layer_types` + linear-attention hyperparameters.

    `layer_types[i]` is `attention` (the teacher's softmax attention), `gdn` (Gated DeltaNet) or
    `gla` (Gated Linear Attention). `teacher_family` records which teacher the softmax layers copy
    (`qkv_bias` for Qwen2, `qk_norm` for Qwen3). `linear_conv_size` 0 turns the short conv off.
    """

    model_type = "hyla_hybrid"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 32000
    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_parameters: dict | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    teacher_family: str = "llama"
    layer_types: list[str] | None = None
    linear_conv_size: int = 4
    gla_gate_rank: int = 16
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        if self.layer_types is None:
            self.layer_types = ["attention"] * self.num_hidden_layers
        if self.teacher_family not in TEACHER_FAMILIES:
            raise ValueError(f"teacher_family must be one of {TEACHER_FAMILIES}, got {self.teacher_family!r}")
        super().__post_init__(**kwargs)

    def validate_layer_type(self) -> None:
        """Every layer is `attention`, `gdn` or `gla`."""
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if bad:
            raise ValueError(f"unknown layer types {bad}; choose from {LAYER_TYPES}")

    @property
    def softmax_layers(self) -> list[int]:
        """Indices of the layers that keep softmax attention."""
        return [i for i, t in enumerate(self.layer_types) if t == "attention"]

    @property
    def linear_layers(self) -> list[int]:
        """Indices of the linear-attention layers."""
        return [i for i, t in enumerate(self.layer_types) if t in LINEAR_TYPES]

    @classmethod
    def from_teacher(cls, teacher: PretrainedConfig, layer_types: list[str] | None = None, **kw: Any) -> "HybridConfig":
        """Build a hybrid config from a Llama / Qwen2 / Qwen3 teacher config."""
        family = teacher.model_type
        if family not in TEACHER_FAMILIES:
            raise ValueError(f"unsupported teacher family {family!r}; supported: {TEACHER_FAMILIES}")
        attention_bias = bool(getattr(teacher, "attention_bias", False))
        qkv_bias = True if family == "qwen2" else attention_bias
        o_bias = False if family == "qwen2" else attention_bias
        rope = getattr(teacher, "rope_parameters", None) or {
            "rope_type": "default",
            "rope_theta": getattr(teacher, "rope_theta", 10000.0),
        }
        return cls(
            vocab_size=teacher.vocab_size,
            hidden_size=teacher.hidden_size,
            intermediate_size=teacher.intermediate_size,
            num_hidden_layers=teacher.num_hidden_layers,
            num_attention_heads=teacher.num_attention_heads,
            num_key_value_heads=getattr(teacher, "num_key_value_heads", None),
            head_dim=getattr(teacher, "head_dim", None),
            hidden_act=teacher.hidden_act,
            max_position_embeddings=teacher.max_position_embeddings,
            rms_norm_eps=teacher.rms_norm_eps,
            rope_parameters=dict(rope),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(getattr(teacher, "mlp_bias", False)),
            qk_norm=family == "qwen3",
            teacher_family=family,
            layer_types=layer_types,
            tie_word_embeddings=bool(getattr(teacher, "tie_word_embeddings", False)),
            pad_token_id=teacher.pad_token_id,
            bos_token_id=teacher.bos_token_id,
            eos_token_id=teacher.eos_token_id,
            **kw,
        )
