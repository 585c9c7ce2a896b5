"""Helpers of the conversion tests: a tiny teacher dir with a tokenizer, text corpora, a CLI runner."""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
from pathlib import Path

import torch

from tests.tiny_models import tiny_teacher, tiny_tokenizer

ESSENTIAL = 1  # the layer the selection test makes indispensable; `uniform` with K=1 of 4 picks layer 2


def teacher_dir(path: Path, essential: int | None = None, seed: int = 0) -> Path:
    """A tiny 4-layer llama teacher + byte-level tokenizer saved as an HF dir.

    With `essential`, that layer's attention is made sharp and strong and every other layer's
    attention output is scaled down: replacing only `essential` by linear attention hurts.
    """
    tok = tiny_tokenizer()
    model = tiny_teacher("llama", layers=4, seed=seed, vocab_size=len(tok), max_position_embeddings=1024)
    if essential is not None:
        with torch.no_grad():
            for i, layer in enumerate(model.model.layers):
                if i == essential:
                    layer.self_attn.q_proj.weight.mul_(6.0)
                    layer.self_attn.o_proj.weight.mul_(4.0)
                else:
                    layer.self_attn.o_proj.weight.mul_(0.3)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def copy_corpus(path: Path, docs: int = 120, seed: int = 0) -> Path:
    """Documents that each repeat a random letter string (an induction / copy pattern)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(docs):
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(rng.randint(20, 60)))
        lines.append(f"{word} | {word} | {word}")
    path.write_text("\n\n".join(lines))
    return path


TINY_BUDGET = [
    "--set", "seq_len=64", "--set", "batch_size=4", "--set", "heldout_tokens=512", "--set", "probe_eval_tokens=256",
    "--set", "stage1_tokens=2048", "--set", "probe_tokens=256", "--set", "stage2_tokens=1024",
    "--set", "kl_chunk_tokens=64", "--set", "stage1_lr=1e-3", "--set", "stage2_lr_mixer=1e-3",
    "--set", "stage2_lr_rest=1e-4", "--set", "probe_lr=1e-3", "--set", "checkpoint_every=4",
]


def tiny_overrides() -> dict[str, str]:
    """TINY_BUDGET as the `overrides` of a ConvertOptions."""
    return dict(TINY_BUDGET[i + 1].split("=") for i in range(0, len(TINY_BUDGET), 2))


def single_thread_env() -> dict[str, str]:
    """Tiny models gain nothing from intra-op threads, and lose a lot on a busy machine."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@contextlib.contextmanager
def single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_convert(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m hyla.convert ARGS` in a subprocess (what `hyla convert` runs)."""
    return subprocess.run(
        [sys.executable, "-m", "hyla.convert", *args], capture_output=True, text=True, timeout=timeout,
        env=single_thread_env(),
    )
