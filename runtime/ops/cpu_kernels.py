"""hyla's C++ CPU kernels for the small ops of a decode step (`csrc/`).

The bf16 linear kernel reads packed weights at close to memory bandwidth where oneDNN does not
for the few rows of a decode step (see :mod:`hyla.runtime.layers.cpu_linear`). Beyond it, a decode
step of a small model on a few cores is bound by the count of PyTorch ops it runs, not by their
arithmetic: RMSNorm, rotary embedding, the KV-cache store and SiLU-and-mul each take several
ops, and decode attention a gather of every context plus a padded SDPA. The kernels here do each
in one op. They are compiled for this machine's CPU (`-march=native`) on first use, which takes
about half a minute once, and cached under `$HYLA_KERNELS` (default `~/.cache/hyla/kernels`; a
scratch `$HYLA_CACHE` does not rebuild them). Where no compiler is found the
PyTorch code they replace runs instead (a warning says so); `HYLA_CPU_KERNELS=0` turns them off.
Each op's PyTorch reference is the layer code it stands in for; the tests compare the two.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import threading
from pathlib import Path

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from hyla.runtime.context import LinearSlots, PagedKV

logger = logging.getLogger(__name__)
CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / name for name in (
    "cpu_decode.cpp", "cpu_linear.cpp", "cpu_gdn.cpp", "cpu_prefill.cpp", "cpu_blocks.cpp", "cpu_scores.cpp",
)]
DTYPES = (torch.bfloat16, torch.float32)
_lock = threading.Lock()
_state: dict[str, bool] = {}


def enabled() -> bool:
    return os.environ.get("HYLA_CPU_KERNELS", "1") != "0"


def _build_key() -> str:
    """Identifies a build: this CPU's instruction set (a shared cache may serve other CPUs), torch,
    and every source and header (torch rebuilds on changed sources, not on changed headers)."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    digest = hashlib.sha1(f"{platform.machine()} {flags} {torch.__version__}".encode())
    for path in sorted(CSRC.iterdir()):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _build() -> bool:
    from torch.utils import cpp_extension

    try:  # the ninja of the `ninja` package, when this environment's scripts are not on PATH
        import ninja

        path = os.environ.get("PATH", "")
        if ninja.BIN_DIR not in path.split(os.pathsep):
            os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{path}"
    except ImportError:
        pass
    root = Path(os.environ.get("HYLA_KERNELS", Path.home() / ".cache" / "hyla" / "kernels"))
    directory = root / f"cpu-{_build_key()}"
    directory.mkdir(parents=True, exist_ok=True)
    if not any(directory.glob("*.so")):
        print("[hyla] compiling the CPU kernels for this machine (once, about half a minute)...", file=sys.stderr, flush=True)
    cpp_extension.load(
        name="hyla_cpu", sources=[str(s) for s in SOURCES], build_directory=str(directory), is_python_module=False,
        extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False,
    )
    return True


def available() -> bool:
    """Whether the kernels are on (`HYLA_CPU_KERNELS`), built and loaded (built on the first call)."""
    if not enabled():
        return False
    if "ok" not in _state:
        with _lock:
            if "ok" not in _state:
                ok = False
                try:
                    ok = _build()
                except Exception as exc:  # no compiler or ninja: the PyTorch ops run instead
                    logger.warning("hyla CPU kernels unavailable, running PyTorch ops: %s", exc)
                _state["ok"] = ok
    return _state["ok"]


def usable(*tensors: Tensor) -> bool:
    """Whether the kernels can take these tensors: CPU inference, one supported dtype. (Called
    several times a layer: the cheap checks go first.)"""
    if torch.is_grad_enabled():
        return False
    dtype = tensors[0].dtype
    if dtype not in DTYPES:
        return False
    for t in tensors:
        if t.dtype != dtype or not t.is_cpu:
            return False
    return available()


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return torch.ops.hyla_cpu.rms_norm(x.contiguous(), weight.contiguous(), eps)


def add_rms_norm(x: Tensor, a: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(x + a, rms_norm(x + a)) in one pass."""
    return torch.ops.hyla_cpu.add_rms_norm(x.contiguous(), a.contiguous(), weight.contiguous(), eps)


def rotary_(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> None:
    """Rotate q `[T, Hq, D]` and k `[T, Hkv, D]` in place by cos/sin `[T, D]`."""
    torch.ops.hyla_cpu.rotary_(q, k, cos, sin)


def store_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor) -> None:
    """`k_cache[slots] = k; v_cache[slots] = v` for k, v `[T, Hkv, D]` and pools `[slots, Hkv, D]`."""
    torch.ops.hyla_cpu.store_kv(k, v, k_cache, v_cache, slots)


def decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, context_lens: Tensor, scale: float,
    block_size: int,
) -> Tensor:
    """One query per sequence over its paged context, read in place; empty contexts give zeros."""
    return torch.ops.hyla_cpu.decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, block_size)


def prefill_supported(q: Tensor) -> bool:
    """Whether `prefill_attention` takes q: bf16 with a head width a multiple of 16, on a CPU with
    AVX512-BF16."""
    return q.dtype == torch.bfloat16 and q.shape[-1] % 16 == 0 and usable(q) and linear_supported()


def prefill_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, cu_seqlens_q: Tensor, context_lens: Tensor,
    scale: float, block_size: int,
) -> Tensor:
    """Causal attention of packed chunks q `[T, Hq, D]` (chunk n's queries are the last of its
    `context_lens[n]` positions) over the paged pool, read in place."""
    return torch.ops.hyla_cpu.prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale,
                                                block_size)


def linear_supported() -> bool:
    """Whether this CPU runs the bf16 tile product (AVX512-BF16) of the linear and prefill kernels."""
    return available() and bool(torch.ops.hyla_cpu.linear_supported())


def pack_linear(weight: Tensor) -> Tensor:
    """A bf16 `[O, I]` weight (I even) as `[ceil(O / 16), I / 2, 16, 2]` blocks for `packed_linear`."""
    return torch.ops.hyla_cpu.pack_linear(weight.contiguous())


def packed_linear(x: Tensor, packed: Tensor, bias: Tensor | None, out_features: int) -> Tensor:
    """`F.linear(x, weight, bias)` in bf16 with fp32 accumulation, for a weight packed by `pack_linear`."""
    return torch.ops.hyla_cpu.packed_linear(x, packed, bias, out_features)


def gdn_forward_(
    qkv: Tensor, gate: Tensor, a: Tensor, b: Tensor, conv_weight: Tensor, conv_state: Tensor, state: Tensor,
    state_idx: Tensor, cu_seqlens: Tensor, a_log: Tensor, dt_bias: Tensor, norm_weight: Tensor, norm_eps: float,
    scale: float,
) -> Tensor:
    """A Gated DeltaNet layer over packed chunks (rows `cu_seqlens[n]:cu_seqlens[n+1]` are sequence
    n's, continuing from state slot `state_idx[n]`), from the stacked projection rows qkv `[T, 3·H·D]`,
    gate `[T, H·D]`, a and b `[T, H]` to `RMSNorm(o)·SiLU(gate)` `[T, H·D]`; the conv and recurrent
    state slots are updated in place."""
    return torch.ops.hyla_cpu.gdn_forward_(
        qkv, gate, a, b, conv_weight, conv_state, state, state_idx, cu_seqlens, a_log, dt_bias, norm_weight,
        norm_eps, scale,
    )


def mlp_residual(
    x: Tensor, a: Tensor, norm_weight: Tensor, eps: float, gate_up: Tensor, gate_up_bias: Tensor | None, inter: int,
    down: Tensor, down_bias: Tensor | None,
) -> Tensor:
    """`h + down(SiLU(gate) * up)` with `h = x + a` and gate/up = the packed `gate_up` product of `RMSNorm(h)`."""
    return torch.ops.hyla_cpu.mlp_residual(x, a, norm_weight, eps, gate_up, gate_up_bias, inter, down, down_bias)


def attention_half(
    x: Tensor, norm_weight: Tensor, eps: float, qkv: Tensor, qkv_bias: Tensor | None, heads: int, kv_heads: int,
    head_dim: int, cos: Tensor, sin: Tensor, kv: PagedKV, scale: float, o: Tensor, o_bias: Tensor | None,
) -> Tensor:
    """`o_proj(attention(rotary(qkv(RMSNorm(x)))))` over the paged pools of `kv`, the new
    keys and values stored; the packed products `qkv` and `o`."""
    return torch.ops.hyla_cpu.attention_half(
        x, norm_weight, eps, qkv, qkv_bias, heads, kv_heads, head_dim, cos, sin, kv.keys, kv.values, kv.slot_mapping,
        kv.block_tables, kv.context_lens, kv.cu_seqlens, kv.decode, scale, kv.block_size, o, o_bias,
    )


def gdn_half(
    x: Tensor, norm_weight: Tensor, eps: float, proj: Tensor, proj_bias: Tensor | None, heads: int, head_dim: int,
    conv_weight: Tensor, slots: LinearSlots, cu_seqlens: Tensor, a_log: Tensor, dt_bias: Tensor, o_norm_weight: Tensor,
    o_norm_eps: float, scale: float, o: Tensor, o_bias: Tensor | None,
) -> Tensor:
    """A Gated DeltaNet mixer from `RMSNorm(x)` on: the packed q/k/v/gate/a/b product `proj`, `gdn_forward_`
    on the state slots of `slots`, the packed output product `o`."""
    return torch.ops.hyla_cpu.gdn_half(
        x, norm_weight, eps, proj, proj_bias, heads, head_dim, conv_weight, slots.conv, slots.recurrent, slots.index,
        cu_seqlens, a_log, dt_bias, o_norm_weight, o_norm_eps, scale, o, o_bias,
    )


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """`F.silu(gate) * up` for `[rows, M]` views."""
    return torch.ops.hyla_cpu.silu_mul(gate, up)


def score_rows(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Log-probability (fp32) and rank (1 = best) of `targets[i]` under `log_softmax(logits[i])`, for
    contiguous `[rows, vocabulary]` logits, without writing the log-softmax."""
    return torch.ops.hyla_cpu.score_rows(logits, targets)

