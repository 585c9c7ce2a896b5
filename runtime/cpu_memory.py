"""CPU memory for the engine: cache tensors mapped on first touch, and glibc malloc settings that
keep freed memory for reuse instead of returning it.

`zeros` gives the KV and state pools zero-filled pages the OS maps only when first written, so a
2 GiB cache neither costs a third of a second to clear at start-up nor occupies memory it does not
use yet.

A prefill step on the CPU allocates activations of several to tens of megabytes per op. By default
glibc serves such blocks with fresh mappings and trims the top of its heap after frees, so each op
pays a page fault for every 4 KiB of its output: measured on 2 cores, an 8 × 512-token prefill of
SmolLM2-135M in bf16 took 1.40–1.77 s that way and 1.24 s without it. `keep_freed_memory` raises
glibc's mmap threshold to its maximum (32 MiB on 64-bit) and turns heap trimming off, once per
process, when a CPU engine starts; the process then keeps what it freed (as vLLM's recommended
tcmalloc does). `HYLA_CPU_MALLOC=0` leaves glibc's defaults; elsewhere than glibc nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import mmap
import os

import torch

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20
"""glibc's upper bound for M_MMAP_THRESHOLD on 64-bit systems."""
TOP_PAD = 64 << 20

_done: list[bool] = []


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """`torch.zeros(shape)`; on the CPU over an anonymous mapping, whose pages the OS maps (zeroed)
    on first touch."""
    numel = math.prod(shape)
    if torch.device(device).type != "cpu" or numel == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.frombuffer(mmap.mmap(-1, numel * dtype.itemsize), dtype=dtype, count=numel).view(shape)


def keep_freed_memory() -> bool:
    """Tune glibc's malloc as above (once per process); whether the settings took."""
    if _done:
        return _done[0]
    ok = False
    if os.environ.get("HYLA_CPU_MALLOC", "1") != "0":
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):  # not glibc
            mallopt = None
        if mallopt is not None:
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            ok = all(mallopt(param, value) == 1 for param, value in (
                (M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, TOP_PAD)))
    _done.append(ok)
    return ok
