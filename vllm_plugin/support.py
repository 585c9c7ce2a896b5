"""What the plugin serves, checked against a hyla config before any layer is built."""

from __future__ import annotations

from types import SimpleNamespace

from hyla.runtime.config import HybridConfig

CPU_CONV_SIZE = 4
"""vLLM's CPU short-conv kernels run on pre-packed weights, and vLLM packs only width-4 convs."""


class UnsupportedHybrid(ValueError):
    """A hyla checkpoint this plugin cannot serve on this vLLM build."""


def check_supported(config: HybridConfig, on_cpu: bool, dtype: object) -> None:
    """Raise `UnsupportedHybrid` naming the first feature vLLM cannot run for this checkpoint."""
    gla = [i for i, t in enumerate(config.layer_types) if t == "gla"]
    if gla:
        raise UnsupportedHybrid(
            f"layers {gla} are GLA: the vLLM plugin serves attention + gdn hybrids only; "
            "serve GLA hybrids with `hyla serve`"
        )
    if config.hidden_act not in ("silu", "swish"):
        raise UnsupportedHybrid(f"hidden_act {config.hidden_act!r}: the vLLM plugin supports silu MLPs")
    if config.linear_layers and config.linear_conv_size < 2:
        raise UnsupportedHybrid("linear_conv_size < 2: vLLM's Gated DeltaNet always runs a short conv")
    if on_cpu and config.linear_layers:
        if config.linear_conv_size != CPU_CONV_SIZE:
            raise UnsupportedHybrid(
                f"linear_conv_size {config.linear_conv_size}: vLLM's CPU Gated DeltaNet needs {CPU_CONV_SIZE}"
            )
        if str(dtype) not in ("torch.bfloat16", "bfloat16"):
            raise UnsupportedHybrid(f"dtype {dtype}: vLLM's CPU Gated DeltaNet runs in bfloat16 only")


def gdn_view(config: HybridConfig) -> SimpleNamespace:
    """The config fields vLLM's Gated DeltaNet layer reads, for hyla's GDN.

    hyla expands K/V to every query head, so key and value heads are both the attention heads and
    both head dims are `head_dim`. The short conv is always followed by SiLU, whatever the MLP uses.
    """
    return SimpleNamespace(
        hidden_size=config.hidden_size,
        hidden_act="silu",
        rms_norm_eps=config.rms_norm_eps,
        linear_num_key_heads=config.num_attention_heads,
        linear_num_value_heads=config.num_attention_heads,
        linear_key_head_dim=config.head_dim,
        linear_value_head_dim=config.head_dim,
        linear_conv_kernel_dim=config.linear_conv_size,
        output_gate_type="silu",
    )
