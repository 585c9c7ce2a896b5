"""What a decode step must move and what a prefill must compute, and the device's measured speeds.

Decode floor: a decode step cannot be faster than the bytes it must touch divided by the device's copy
bandwidth. Prefill utilisation: model FLOPs of the prefill per second over the measured matmul peak.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from hyla.runtime.config import HybridConfig
from hyla.runtime.model import HybridForCausalLM


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of the decoder layers + final norm, and of the lm_head matrix (`vocab·hidden`)."""

    decoder: int
    lm_head: int


def param_counts(config: HybridConfig) -> ParamCounts:
    """Counted on a meta-device model, so any shape is free to count."""
    with torch.device("meta"):
        model = HybridForCausalLM(config)
    decoder = sum(p.numel() for p in model.model.layers.parameters()) + sum(
        p.numel() for p in model.model.norm.parameters()
    )
    return ParamCounts(decoder, model.lm_head.weight.numel())


@dataclass(frozen=True)
class DecodeBytes:
    """Bytes one decode step of a batch must move, by kind."""

    weights: int
    kv: int
    linear_state: int
    conv_state: int

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.linear_state + self.conv_state

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def decode_bytes(
    config: HybridConfig, batch: int, context: float, dtype: torch.dtype, state_dtype: torch.dtype = torch.float32
) -> DecodeBytes:
    """Bytes a decode step touches at least, for `batch` sequences of `context` cached tokens.

    - weights: every decoder parameter and the lm_head matrix read once, in `dtype` (the `batch`
      embedding rows gathered are left out);
    - kv: per sequence and softmax layer, K and V of the `context` cached tokens read and the new
      token's written: `2·Hkv·D·(context + 1)` elements of `dtype`;
    - linear_state: per sequence and linear layer, the `H·D·D` recurrent state read and written,
      in `state_dtype`;
    - conv_state: per sequence and linear layer, the `3·H·D·(W-1)` short-conv state read and written,
      in `dtype`.
    """
    params = param_counts(config)
    item, state_item = _itemsize(dtype), _itemsize(state_dtype)
    h, hkv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    n_soft, n_lin = len(config.softmax_layers), len(config.linear_layers)
    width = max(config.linear_conv_size - 1, 0)
    return DecodeBytes(
        weights=(params.decoder + params.lm_head) * item,
        kv=round(batch * n_soft * 2 * hkv * d * (context + 1) * item),
        linear_state=batch * n_lin * 2 * h * d * d * state_item,
        conv_state=batch * n_lin * 2 * 3 * h * d * width * item,
    )


def prefill_flops(config: HybridConfig, batch: int, context: int) -> float:
    """Model FLOPs of prefilling `batch` prompts of `context` tokens and producing their first logits.

        2·P_decoder·B·T                      every decoder weight, one multiply-add per token
      + 2·hidden·vocab·B                     lm_head, for the last position of each prompt
      + L_softmax · 2·2·(T²/2)·Hq·D·B        causal QKᵀ and PV (half the T×T scores)
      + L_linear · 6·Hq·D²·B·T               recurrent form of the linear mixers: S·k, the rank-1
                                             state update and S·q, one D×D product each per head

    with T = `context`, B = `batch`, P_decoder the decoder layers' parameters (the embedding lookup
    costs no FLOPs; norms, activations and the softmax are left out).
    """
    params = param_counts(config)
    h, d = config.num_attention_heads, config.head_dim
    tokens = batch * context
    attention = len(config.softmax_layers) * 2 * context * context * h * d * batch
    linear = len(config.linear_layers) * 6 * h * d * d * tokens
    return 2.0 * params.decoder * tokens + 2.0 * params.lm_head * batch + attention + linear


def _timed(device: torch.device, fn, repeats: int) -> float:
    """Best wall-clock seconds of `fn()` over `repeats` runs (after one warm-up), device-synchronised."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    return best


def copy_bandwidth(device: str, nbytes: int | None = None, repeats: int = 5) -> float:
    """Measured copy bandwidth in bytes/s: a large same-device `copy_`, counting bytes read + written."""
    dev = torch.device(device)
    nbytes = nbytes or (2 << 30 if dev.type == "cuda" else 256 << 20)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    seconds = _timed(dev, lambda: dst.copy_(src), repeats)
    return 2 * nbytes / seconds


def matmul_peak(device: str, dtype: torch.dtype, n: int | None = None, repeats: int = 5) -> float:
    """Measured dense matmul FLOP/s in `dtype` (an n×n by n×n product)."""
    dev = torch.device(device)
    n = n or (8192 if dev.type == "cuda" else 1024)
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    seconds = _timed(dev, lambda: a @ b, repeats)
    return 2 * n**3 / seconds
