"""glibc malloc tuning of the CPU engine: freed activations are reused without page faults."""

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
