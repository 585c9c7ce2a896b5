"""hyla checkpoint names → the plugin's vLLM parameters (and the shard each tensor fills)."""

from __future__ import annotations

import re

import torch

Shard = int | str | None

# Per mixer type: checkpoint module → (vLLM module, shard of a merged projection).
MIXER_NAMES: dict[str, dict[str, tuple[str, Shard]]] = {
    "attention": {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v")},
    "gdn": {
        "q_proj": ("in_proj_qkvz", 0),
        "k_proj": ("in_proj_qkvz", 1),
        "v_proj": ("in_proj_qkvz", 2),
        "g_proj": ("in_proj_qkvz", 3),
        "b_proj": ("in_proj_ba", 0),
        "a_proj": ("in_proj_ba", 1),
        "conv_weight": ("conv1d.weight", None),
        "o_norm": ("norm", None),
        "o_proj": ("out_proj", None),
    },
}
MLP_NAMES: dict[str, tuple[str, Shard]] = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.([^.]+)(.*)")


def vllm_weight(name: str, tensor: torch.Tensor, layer_types: list[str]) -> tuple[str, Shard, torch.Tensor]:
    """The vLLM parameter a checkpoint tensor loads into, its shard id, and the tensor to load."""
    match = _LAYER_KEY.fullmatch(name)
    if match is None:
        return name, None, tensor
    layer, block, module, rest = match.groups()
    table = MLP_NAMES if block == "mlp" else MIXER_NAMES.get(layer_types[int(layer)], {})
    target, shard = table.get(module, (module, None))
    if module == "conv_weight":
        tensor = tensor.unsqueeze(1)  # [C, W] → vLLM's depthwise-conv layout [C, 1, W]
    return f"model.layers.{layer}.{block}.{target}{rest}", shard, tensor
