"""Architecture summary and cache-size arithmetic for any loadable model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from hyla.runtime.config import HybridConfig


def as_hybrid_config(config: PretrainedConfig) -> HybridConfig:
    """A hybrid view of any config: a teacher is a hybrid whose layers are all softmax attention."""
    return config if isinstance(config, HybridConfig) else HybridConfig.from_teacher(config)


@dataclass(frozen=True)
class CacheSizes:
    """Bytes of cache one sequence needs: KV grows per token, linear state is fixed per sequence."""

    kv_bytes_per_token: int
    state_bytes_per_sequence: int

    def bytes_for(self, tokens: int) -> int:
        return self.kv_bytes_per_token * tokens + self.state_bytes_per_sequence


def cache_sizes(
    config: HybridConfig, kv_dtype: torch.dtype = torch.bfloat16, state_dtype: torch.dtype = torch.float32
) -> CacheSizes:
    """KV bytes per token (softmax layers) and recurrent + conv state bytes per sequence (linear layers)."""
    kv_item = torch.empty((), dtype=kv_dtype).element_size()
    state_item = torch.empty((), dtype=state_dtype).element_size()
    d, h = config.head_dim, config.num_attention_heads
    kv = 2 * len(config.softmax_layers) * config.num_key_value_heads * d * kv_item
    recurrent = h * d * d * state_item
    conv = 3 * h * d * max(config.linear_conv_size - 1, 0) * kv_item
    return CacheSizes(kv, len(config.linear_layers) * (recurrent + conv))


def parameter_count(config: HybridConfig) -> int:
    """Parameters of the hybrid built from `config` (tied embeddings counted once)."""
    from hyla.runtime.model import HybridForCausalLM

    with torch.device("meta"):
        model = HybridForCausalLM(config)
    seen = {id(p): p.numel() for p in model.parameters()}
    return sum(seen.values())


def layer_pattern(config: HybridConfig) -> str:
    """One letter a layer: A = softmax attention, D = Gated DeltaNet, L = GLA."""
    letters = {"attention": "A", "gdn": "D", "gla": "L"}
    return "".join(letters[t] for t in config.layer_types)


def describe(config: PretrainedConfig, dtype: torch.dtype = torch.bfloat16) -> dict[str, object]:
    """Everything `hyla info` prints, as a dict."""
    hc = as_hybrid_config(config)
    sizes = cache_sizes(hc, kv_dtype=dtype)
    return {
        "architecture": "hybrid" if isinstance(config, HybridConfig) else "teacher",
        "family": hc.teacher_family,
        "layers": hc.num_hidden_layers,
        "hidden_size": hc.hidden_size,
        "heads": hc.num_attention_heads,
        "kv_heads": hc.num_key_value_heads,
        "head_dim": hc.head_dim,
        "vocab_size": hc.vocab_size,
        "max_position_embeddings": hc.max_position_embeddings,
        "layer_types": layer_pattern(hc),
        "softmax_layers": hc.softmax_layers,
        "parameters": parameter_count(hc),
        "dtype": str(dtype).removeprefix("torch."),
        "kv_bytes_per_token": sizes.kv_bytes_per_token,
        "state_bytes_per_sequence": sizes.state_bytes_per_sequence,
    }
