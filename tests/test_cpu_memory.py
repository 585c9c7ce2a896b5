"""CPU memory of the engine: freed activations are reused without page faults (glibc malloc tuning),
and its cache pools take memory only where they are written."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hyla.runtime.engine import LLMEngine
from hyla.runtime.engine_config import EngineConfig
from tests.tiny_models import tiny_teacher

PROBE = """
import resource, sys, torch
from hyla.runtime.cpu_memory import keep_freed_memory
tuned = keep_freed_memory() if sys.argv[1] == "1" else False
def churn():  # a prefill's pattern: large outputs of several sizes, made and dropped
    for mib in (25, 8, 12, 25, 5, 20):
        torch.empty(mib << 20, dtype=torch.uint8).fill_(1)
for _ in range(3):  # the first rounds touch the heap's new pages once
    churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(int(tuned), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(tune: bool) -> tuple[bool, int]:
    """(whether the tuning took, page faults of a churn after warm-up) in a fresh process."""
    out = subprocess.run([sys.executable, "-c", PROBE, "1" if tune else "0"], capture_output=True, text=True, check=True)
    tuned, count = out.stdout.split()
    return tuned == "1", int(count)


def test_freed_activations_are_reused_without_page_faults() -> None:
    tuned, count = faults(True)
    if not tuned:
        pytest.skip("not glibc")
    assert count < 500  # 95 MiB rewritten: 24,000 pages, each a fault if the memory had gone back


def test_a_cpu_engine_tunes_the_process() -> None:
    from hyla.runtime import cpu_memory

    LLMEngine(tiny_teacher("llama"), None, EngineConfig(model="tiny", cache_memory="16MiB"))
    assert cpu_memory._done


def _resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_cache_pools_are_zeros_that_take_memory_only_where_written() -> None:
    import torch

    from hyla.runtime.cpu_memory import zeros

    before = _resident()
    pool = zeros((4, 64, 1 << 20), torch.bfloat16, "cpu")  # 512 MiB
    assert _resident() - before < 32 << 20
    assert pool.is_contiguous() and not pool[::7, ::5, ::4099].any()
    pool[1, 3, :1000] = 2.5
    assert _resident() - before < 32 << 20  # one page written
    assert float(pool[1, 3].float().sum()) == 2500.0 and not pool[2].any()
    assert torch.equal(zeros((3, 0), torch.float32, "cpu"), torch.zeros(3, 0))
