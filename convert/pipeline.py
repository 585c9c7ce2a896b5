"""The conversion pipeline: steps 0–6, each persisted in the output dir so a killed run resumes.

`DIR/state/step_N.json` marks step N done (with its summary); a rerun with the same settings
skips finished steps, continues a training stage from its last checkpoint and a selection from
the probes already on disk. `DIR/convert_settings.json` pins the settings a dir was started with.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hyla.convert.budgets import Budget, get_budget
from hyla.convert.data import BatchStream, prepare_blocks
from hyla.convert.distributed import Dist, init_distributed, shutdown
from hyla.convert.evaluate import TeacherReference, score
from hyla.convert.finetune import repack, run_finetune
from hyla.convert.jsonfile import write_json
from hyla.convert.loop import LoopSettings, StageResult
from hyla.convert.probes import ProbeRunner
from hyla.convert.report import write_report
from hyla.convert.reuse import adopt
from hyla.convert.selection import parse_selection, select_layers, softmax_count
from hyla.convert.stage1 import run_stage1
from hyla.convert.stage2 import run_stage2
from hyla.convert.students import make_student, save_mixers
from hyla.runtime.config import LINEAR_TYPES
from hyla.runtime.loading import load_model, load_tokenizer
from hyla.runtime.ops.fla_backend import training_kernels

STEPS = ("data", "teacher", "stage1", "selection", "stage2", "stage3", "export")
TEACHER_HIDDEN, MIXERS = "teacher/heldout_hidden.pt", "stage1/mixers.safetensors"


def step_file(step: str) -> str:
    """Where a run keeps the mark of a finished step (relative to its folder)."""
    return f"state/step_{STEPS.index(step)}_{step}.json"


@dataclass(frozen=True)
class ConvertOptions:
    """What `hyla convert` was asked to do. All fields but `out`, `device` and `quiet` pin a run."""

    teacher: str
    out: Path
    linear: str = "gdn"
    softmax_layers: int | None = None
    softmax_ratio: float = 0.25
    selection: str = "kl-guided"
    data: str = "default"
    extra_data: str | None = None
    """A generated corpus folder (`hyla corpus`) whose samples join the training split."""
    budget: str = "quick"
    overrides: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    device: str = "cpu"
    quiet: bool = False
    stage1_from: str | None = None
    """A conversion whose stage-1 student, probes and teacher reference this one takes over (`reuse`)."""

    def settings(self) -> dict:
        d = dataclasses.asdict(self)
        for key in ("out", "device", "quiet", "stage1_from"):
            d.pop(key)
        if d["extra_data"] is None:  # settings of runs made before the option existed stay equal
            d.pop("extra_data")
        return d


class Pipeline:
    """Runs (or resumes) one conversion into `options.out`."""

    def __init__(self, options: ConvertOptions) -> None:
        if options.linear not in LINEAR_TYPES:
            raise ValueError(f"--linear must be one of {LINEAR_TYPES}, got {options.linear!r}")
        self.opt = options
        self.out = Path(options.out)
        self.budget: Budget = get_budget(options.budget, options.overrides)
        self.state = self.out / "state"

    # -- bookkeeping -------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.dist.is_main:
            print(f"[convert] {msg}", file=sys.stderr, flush=True)

    def done(self, step: str) -> dict | None:
        path = self.out / step_file(step)
        return json.loads(path.read_text()) if path.is_file() else None

    def begin(self, step: str) -> dict | None:
        """`done(step)` as every rank sees it: no rank can mark the step before all have looked."""
        self.dist.barrier()
        summary = self.done(step)
        self.dist.barrier()
        return summary

    def mark(self, step: str, summary: dict) -> dict:
        if self.dist.is_main:
            self.state.mkdir(parents=True, exist_ok=True)
            write_json(self.out / step_file(step), summary)
        return summary

    def _pin_settings(self) -> None:
        path = self.out / "convert_settings.json"
        settings = self.opt.settings()
        started = any(self.state.glob("step_*.json"))
        if path.is_file() and started:
            before = json.loads(path.read_text())
            if before != settings:
                diff = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
                raise ValueError(
                    f"{self.out} holds a conversion with other settings {diff} (was, now); "
                    "rerun with the same settings to resume, or choose another --out"
                )
        elif not path.is_file():
            if self.out.exists() and any(self.out.iterdir()):
                raise ValueError(f"{self.out} exists, is not empty and holds no conversion; choose another --out")
            self.out.mkdir(parents=True, exist_ok=True)
        if not started:  # nothing done yet: (re)pin, so a run that failed on bad input can be fixed
            path.write_text(json.dumps(settings, indent=2))

    def _adopt_stage1(self) -> None:
        source = self.opt.stage1_from
        if source is None or self.done("stage1"):
            return
        files = [step_file("data"), step_file("stage1"), MIXERS]
        probes = adopt(Path(source), self.out, self.opt.settings(), files, self.opt.selection,
                       optional=[step_file("teacher"), TEACHER_HIDDEN])
        self.log(f"stage 1 and {probes} probes taken from {source}")

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> Path:
        """Run every unfinished step; returns the report path."""
        self.dist: Dist = init_distributed(self.opt.device)
        try:
            if self.dist.is_main:
                self._pin_settings()
                self._adopt_stage1()
            self.dist.barrier()
            if self.begin("export"):
                self.log(f"{self.out} is already converted; nothing to do")
                return self.out / "conversion_report.json"
            return self._run_steps()
        finally:
            shutdown(self.dist)

    def _run_steps(self) -> Path:
        began = time.perf_counter()
        dev = self.dist.device
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        self.tokenizer = load_tokenizer(self.opt.teacher)
        self.teacher = load_model(self.opt.teacher, dtype, dev)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        num_layers = self.teacher.config.num_hidden_layers
        method, explicit = parse_selection(self.opt.selection, num_layers)
        k = len(explicit) if explicit is not None else softmax_count(
            num_layers, self.opt.softmax_layers, self.opt.softmax_ratio
        )

        data = self._data()
        train = data.train
        ref = self._reference(data.heldout)
        mixers = self._stage1(train)
        selected = self._selection(method, explicit, k, mixers, train, ref)
        student = self._stage2(selected, mixers, train)
        student = self._stage3(student, train)
        report = self._export(student, selected, ref, began)
        self.log(f"done: {self.out} (report {report})")
        return report

    def _data(self):
        b = self.budget
        needed = (b.stage1_tokens + b.stage2_tokens + b.stage3_tokens) or b.heldout_tokens
        args = (self.opt.data, self.tokenizer, b.seq_len, b.heldout_tokens, needed, self.opt.seed, self.opt.extra_data)
        if self.dist.is_main:
            blocks = prepare_blocks(*args)
        self.dist.barrier()
        if not self.dist.is_main:
            blocks = prepare_blocks(*args)
        before = self.begin("data")
        if before is not None and {**before, "cache": None} != {**blocks.meta, "cache": None}:
            raise ValueError(f"the data came out otherwise than for the steps already done (here or in "
                             f"--stage1-from): {before} then, {blocks.meta} now")
        if before is None:
            self.log(f"data: {blocks.meta['train_tokens']:,} train / {blocks.meta['heldout_tokens']:,} held-out tokens")
            self.mark("data", blocks.meta)
        return blocks

    def _reference(self, heldout: torch.Tensor) -> TeacherReference:
        path = self.out / TEACHER_HIDDEN
        if self.begin("teacher") and path.is_file():
            hidden = torch.load(path, map_location=self.dist.device)
            return TeacherReference(heldout, hidden, self.teacher.lm_head.weight.detach())
        began = time.perf_counter()
        ref = TeacherReference.build(self.teacher, heldout, self.budget.batch_size)
        metrics = score(self.teacher, ref, self.budget.batch_size, self.budget.kl_chunk_tokens, with_kl=False)
        if self.dist.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(ref.hidden, path)
        self.log(f"teacher held-out perplexity {metrics['ppl']:.2f}")
        self.mark("teacher", {"ppl": metrics["ppl"], "kl": 0.0, "tokens": metrics["tokens"],
                              "seconds": round(time.perf_counter() - began, 2)})
        return ref

    def _loop(self, step: str, steps: int) -> LoopSettings:
        """Loop settings of a training step, checkpointing to `DIR/<step>/checkpoint.pt`."""
        b = self.budget
        return LoopSettings(
            steps, self.dist, b.warmup_steps, self.out / step / "checkpoint.pt", b.checkpoint_interval(steps),
            self.opt.quiet,
        )

    def _trained(self, step: str, loss: str, result: StageResult) -> None:
        """Log and mark a finished training step with its speed and what trained the mixers."""
        summary = {**result.summary(), "mixer_kernels": training_kernels(self.opt.linear, self.dist.device)}
        rate, steady = summary["tokens_per_s"], summary["steady_tokens_per_s"]
        self.log(f"{step}: {loss} {summary['final_loss']} in {result.seconds:.0f}s"
                 + (f", {rate:.0f} tok/s" if rate else "") + (f" ({steady:.0f} once warm)" if steady else "")
                 + f", mixers on {summary['mixer_kernels']}"
                 + (", steps replayed from a CUDA graph" if result.graphed else ""))
        self.mark(step, summary)
        if self.dist.is_main:  # the stage's result is saved: its resume point is of no more use
            (self.out / step / "checkpoint.pt").unlink(missing_ok=True)

    def _stage1(self, train: torch.Tensor) -> Path:
        path = self.out / MIXERS
        if self.begin("stage1"):
            return path
        b = self.budget
        torch.manual_seed(self.opt.seed)
        student = make_student(self.teacher, [], self.opt.linear, self.opt.seed).to(self.dist.device)
        stream = BatchStream(train, b.batch_size, self.opt.seed, self.dist.rank, self.dist.world)
        result = run_stage1(self.teacher, student, stream, b.stage1_lr, self._loop("stage1", b.steps(b.stage1_tokens)))
        if self.dist.is_main:
            save_mixers(student, path)
        self._trained("stage1", "loss", result)
        return path

    def _selection(self, method, explicit, k, mixers, train, ref) -> list[int]:
        summary = self.begin("selection")
        if summary:
            return summary["selected"]
        if method == "layers":
            summary = {"method": "layers", "selected": explicit, "probes": []}
        else:
            b = self.budget
            runner = ProbeRunner(
                self.teacher, mixers, self.opt.linear, self.opt.seed, b, train, ref.prefix(b.probe_eval_tokens),
                self.dist, self.opt.quiet,
            )
            began = time.perf_counter()
            summary = select_layers(method, k, self.teacher.config.num_hidden_layers, runner, self.out)
            summary["seconds"] = round(time.perf_counter() - began, 2)
        self.log(f"selection ({summary['method']}): softmax layers {summary['selected']}")
        return self.mark("selection", summary)["selected"]

    def _stage2(self, selected: list[int], mixers: Path, train: torch.Tensor):
        path = self.out / "stage2" / "student.pt"
        student = make_student(self.teacher, selected, self.opt.linear, self.opt.seed, mixers).to(self.dist.device)
        if self.begin("stage2"):
            student.load_state_dict(torch.load(path, map_location=self.dist.device))
            return student
        b = self.budget
        torch.manual_seed(self.opt.seed)
        stream = BatchStream(train, b.batch_size, self.opt.seed + 1, self.dist.rank, self.dist.world)
        result = run_stage2(
            "stage 2", self.teacher, student, stream, b.stage2_lr_mixer, b.stage2_lr_rest, b.kl_chunk_tokens,
            self._loop("stage2", b.steps(b.stage2_tokens)),
        )
        if self.dist.is_main:
            torch.save(student.state_dict(), path)
        self._trained("stage2", "KL", result)
        return student

    def _stage3(self, student, train: torch.Tensor):
        b = self.budget
        path = self.out / "stage3" / "student.pt"
        summary = self.begin("stage3")
        if summary:
            if not summary.get("skipped"):
                student.load_state_dict(torch.load(path, map_location=self.dist.device))
            return student
        steps = b.steps(b.stage3_tokens, b.stage3_seq_len or b.seq_len)
        if not steps:
            self.mark("stage3", {"skipped": True})
            return student
        blocks = repack(train, b.stage3_seq_len or b.seq_len)
        stream = BatchStream(blocks, b.batch_size, self.opt.seed + 2, self.dist.rank, self.dist.world)
        result = run_finetune(student, stream, b.stage3_lr, self._loop("stage3", steps))
        if self.dist.is_main:
            torch.save(student.state_dict(), path)
        self._trained("stage3", "loss", result)
        return student

    def _export(self, student, selected: list[int], ref: TeacherReference, began: float) -> Path:
        b = self.budget
        self.begin("export")
        metrics = {"teacher": {k: v for k, v in self.done("teacher").items() if k in ("kl", "ppl", "tokens")}}
        untrained = make_student(self.teacher, selected, self.opt.linear, self.opt.seed).to(self.dist.device)
        metrics["untrained_transfer"] = score(untrained, ref, b.batch_size, b.kl_chunk_tokens)
        del untrained
        metrics["result"] = score(student, ref, b.batch_size, b.kl_chunk_tokens)
        report_path = self.out / "conversion_report.json"
        if self.dist.is_main:
            student.generation_config = self.teacher.generation_config
            student.to(self.teacher.dtype).save_pretrained(self.out)  # bf16 on CUDA, fp32 on CPU
            self.tokenizer.save_pretrained(self.out)
            stages = {n: self.done(n) for n in ("stage1", "stage2", "stage3") if not self.done(n).get("skipped")}
            previous = sum(s.get("seconds", 0) for s in (self.done(n) or {} for n in STEPS))
            report = {
                "teacher": self.opt.teacher,
                "linear": self.opt.linear,
                "layer_types": student.config.layer_types,
                "settings": self.opt.settings(),
                "stage1_from": self.opt.stage1_from,
                "budget": dataclasses.asdict(b),
                "data": self.done("data"),
                "selection": self.done("selection"),
                "stages": stages,
                "heldout": metrics,
                "kl_reduction_vs_untrained": metrics["untrained_transfer"]["kl"] / max(metrics["result"]["kl"], 1e-12),
                "processes": self.dist.world,
                "device": str(self.dist.device),
                "wall_seconds_this_run": round(time.perf_counter() - began, 2),
                "wall_seconds_steps": round(previous, 2),
            }
            write_report(self.out, report)
        self.log(
            "held-out KL / ppl: teacher 0 / {:.2f}, untrained transfer {:.4f} / {:.2f}, result {:.4f} / {:.2f}".format(
                metrics["teacher"]["ppl"], metrics["untrained_transfer"]["kl"], metrics["untrained_transfer"]["ppl"],
                metrics["result"]["kl"], metrics["result"]["ppl"],
            )
        )
        self.mark("export", {"heldout": metrics})
        if self.dist.is_main:  # the exported model holds them
            for stage in ("stage2", "stage3"):
                (self.out / stage / "student.pt").unlink(missing_ok=True)
        return report_path


def convert(options: ConvertOptions) -> Path:
    """Run or resume a conversion; returns the path of `conversion_report.json`."""
    return Pipeline(options).run()
