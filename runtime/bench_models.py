"""Random-weight models of real shapes, so engine numbers need no checkpoint.

Each shape is a teacher architecture; `bench_configs` gives the teacher (all softmax attention) and
its hybrid (a fraction of the layers kept as softmax attention, evenly spaced, the rest Gated DeltaNet).
"""

from __future__ import annotations

import torch

from hyla.runtime.config import HybridConfig
from hyla.runtime.model import HybridForCausalLM

SHAPES: dict[str, dict[str, object]] = {
    "tiny": dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    "smollm2-135m": dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
        tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    ),
    "llama-3.2-1b": dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5,
        tie_word_embeddings=True, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
        },
    ),
}


def hybrid_layer_types(num_layers: int, softmax_fraction: float = 0.25, linear: str = "gdn") -> list[str]:
    """`softmax_fraction` of the layers as softmax attention, evenly spaced; the others `linear`."""
    keep = max(1, round(num_layers * softmax_fraction))
    softmax = {round((i + 0.5) * num_layers / keep - 0.5) for i in range(keep)}
    return ["attention" if i in softmax else linear for i in range(num_layers)]


def shape_config(shape: str, layer_types: list[str] | None = None) -> HybridConfig:
    """The config of a named shape; all layers softmax attention unless `layer_types` says otherwise."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {sorted(SHAPES)}")
    return HybridConfig(**SHAPES[shape], layer_types=layer_types, pad_token_id=0)


def bench_configs(config: HybridConfig, softmax_ratio: float = 0.25) -> dict[str, HybridConfig]:
    """`teacher` (every layer softmax) and `hybrid` (`softmax_ratio` softmax, the rest GDN) of a config."""
    n = config.num_hidden_layers
    base = config.to_dict()
    return {
        "teacher": HybridConfig(**{**base, "layer_types": ["attention"] * n}),
        "hybrid": HybridConfig(**{**base, "layer_types": hybrid_layer_types(n, softmax_ratio)}),
    }


def random_model(config: HybridConfig, device: str, dtype: torch.dtype, seed: int = 0) -> HybridForCausalLM:
    """A randomly initialised `HybridForCausalLM` on `device` in `dtype`, in eval mode."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = HybridForCausalLM(config)
    return model.to(dtype).eval()
