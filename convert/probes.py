"""Selection probes: restore some layers to the teacher's softmax attention on the stage-1 student,
run a short stage 2, and score by held-out KL to the teacher.

Every probe uses the same seed and data order, so probes differ only in which layers are softmax.
Each probe's result is written to `<folder>/layer_XX.json` as soon as it finishes; a rerun skips
probes already on disk. With several processes, rank r runs every world-th pending probe.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import PreTrainedModel

from hyla.convert.budgets import Budget
from hyla.convert.data import BatchStream
from hyla.convert.distributed import Dist
from hyla.convert.evaluate import TeacherReference, score
from hyla.convert.loop import LoopSettings
from hyla.convert.stage2 import run_stage2
from hyla.convert.students import autocast, hidden_from, layer_inputs, make_student

PREFIX_CACHE_BYTES = 2 << 30


def probe_path(folder: Path, layer: int) -> Path:
    return folder / f"layer_{layer:02d}.json"


@dataclass
class ProbeRunner:
    """Everything a probe needs; `run` fans a set of candidate layers out over the ranks."""

    teacher: PreTrainedModel
    mixers: Path
    linear: str
    seed: int
    budget: Budget
    train_blocks: torch.Tensor
    reference: TeacherReference
    dist: Dist
    quiet: bool = False
    _prefix: tuple[tuple[int, ...], list[list[torch.Tensor]]] | None = None

    def _shared_prefix(self, base: list[int]) -> list[list[torch.Tensor]] | None:
        """Per batch, the residual stream entering each layer of the base student (zero-step probes only).

        A zero-step probe differs from the base student only from its restored layer on, so it runs
        just those layers. None when probes train or the cache would be too large.
        """
        if self.budget.probe_tokens:
            return None
        cfg = self.teacher.config
        size = self.reference.blocks.numel() * cfg.hidden_size * cfg.num_hidden_layers * 4
        if size > PREFIX_CACHE_BYTES:
            return None
        if self._prefix is None or self._prefix[0] != tuple(base):
            student = make_student(self.teacher, base, self.linear, self.seed, self.mixers).to(self.dist.device)
            bs, blocks = self.budget.batch_size, self.reference.blocks
            with torch.no_grad(), autocast(self.dist.device):
                cached = [
                    layer_inputs(student, blocks[i : i + bs].to(self.dist.device)) for i in range(0, len(blocks), bs)
                ]
            self._prefix = (tuple(base), cached)
        return self._prefix[1]

    def probe(
        self, softmax: list[int], layer: int | None = None, base: list[int] | None = None, checkpoint: Path | None = None
    ) -> dict:
        """Score the stage-1 student with `softmax` layers restored (after a short stage 2).

        `layer`/`base`: `softmax` is `base` plus `layer`, so a zero-step probe can reuse the base prefix.
        `checkpoint`: where the probe's training checkpoints (and resumes from).
        """
        began = time.perf_counter()
        torch.manual_seed(self.seed)
        student = make_student(self.teacher, softmax, self.linear, self.seed, self.mixers)
        steps = self.budget.steps(self.budget.probe_tokens)
        curve = []
        if steps:
            stream = BatchStream(self.train_blocks, self.budget.batch_size, self.seed)
            local = replace(self.dist, rank=0, world=1)
            result = run_stage2(
                f"probe {softmax}", self.teacher, student, stream, self.budget.probe_lr,
                self.budget.probe_lr * self.budget.stage2_lr_rest / self.budget.stage2_lr_mixer,
                self.budget.kl_chunk_tokens,
                LoopSettings(
                    steps, local, self.budget.warmup_steps, checkpoint, self.budget.checkpoint_interval(steps), quiet=True
                ),
            )
            curve = result.curve
        prefix = self._shared_prefix(base) if layer is not None and base is not None else None
        forward = None
        if prefix is not None:
            bs = self.budget.batch_size
            forward = lambda ids, first: hidden_from(student, prefix[first // bs][layer], ids, layer)  # noqa: E731
        metrics = score(student, self.reference, self.budget.batch_size, self.budget.kl_chunk_tokens, forward=forward)
        return {
            "softmax_layers": sorted(softmax),
            "kl": metrics["kl"],
            "ppl": metrics["ppl"],
            "train_tokens": steps * self.budget.batch_size * self.budget.seq_len,
            "seconds": round(time.perf_counter() - began, 2),
            "curve": curve,
        }

    def run(self, candidates: list[int], base: list[int], folder: Path, label: str = "probes") -> dict[int, dict]:
        """Probe each candidate layer added to `base`; returns `{layer: result}` (read back from disk)."""
        from tqdm import tqdm

        folder.mkdir(parents=True, exist_ok=True)
        mine = candidates[self.dist.rank :: self.dist.world]
        pending = [c for c in mine if not probe_path(folder, c).is_file()]
        bar = tqdm(total=len(mine), initial=len(mine) - len(pending), desc=label, unit="probe",
                   disable=self.quiet or not self.dist.is_main)
        for layer in pending:
            checkpoint = probe_path(folder, layer).with_suffix(".checkpoint.pt")
            result = {"layer": layer, **self.probe(sorted({*base, layer}), layer, base, checkpoint)}
            tmp = probe_path(folder, layer).with_suffix(".tmp")
            tmp.write_text(json.dumps(result))
            tmp.rename(probe_path(folder, layer))
            checkpoint.unlink(missing_ok=True)
            bar.set_postfix(layer=layer, kl=f"{result['kl']:.4f}")
            bar.update(1)
            if self.quiet and self.dist.is_main:
                print(f"[{label}] layer {layer}: kl {result['kl']:.4f} ({result['seconds']:.1f}s)", flush=True)
        bar.close()
        self.dist.barrier()
        return {c: json.loads(probe_path(folder, c).read_text()) for c in candidates}
