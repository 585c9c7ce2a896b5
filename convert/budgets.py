"""Token budgets, learning rates and sequence lengths of each conversion step, by preset.

`quick` fits a 135M teacher on a 2-core CPU in well under 15 minutes; `study` is the layer-selection
study's (SmolLM2-135M on one H200 with fla: 5 minutes for stage 1 and 13 for the probes, then each
model's stage 2); `standard` is a single-GPU afternoon; `paper` follows the scale of the KL-guided
selection paper (stage 1 ≈ 100M tokens, each probe ≈ 0.2B, stage 2 ≈ 0.6B). Every field can be overridden (`hyla convert --set stage2_tokens=1e6`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Budget:
    """How much of everything one conversion spends. Token counts are totals over all processes."""

    seq_len: int = 256
    batch_size: int = 4
    heldout_tokens: int = 2048
    """Held-out tokens used for the final KL / perplexity report."""
    probe_eval_tokens: int = 512
    """Held-out tokens each selection probe is scored on (a prefix of the held-out split)."""
    stage1_tokens: int = 16384
    stage1_lr: float = 2e-3
    probe_tokens: int = 0
    """Stage-2 tokens each probe trains for before scoring; 0 scores the stage-1 student as is."""
    probe_lr: float = 1e-4
    stage2_tokens: int = 4096
    stage2_lr_mixer: float = 1e-4
    stage2_lr_rest: float = 7e-6
    stage3_tokens: int = 0
    stage3_lr: float = 1e-5
    stage3_seq_len: int = 0
    """Sequence length of the CE finetune; 0 uses `seq_len`."""
    warmup_steps: int = 2
    kl_chunk_tokens: int = 512
    """Tokens per chunk of the full-vocabulary KL: at most this many rows of logits exist at a time."""
    checkpoint_every: int = 50
    """Most optimizer steps between resumable stage checkpoints."""
    min_checkpoints: int = 4
    """Checkpoints every training stage writes at least (shorter stages checkpoint more often)."""

    def steps(self, tokens: int, seq_len: int | None = None) -> int:
        """Optimizer steps that spend `tokens` with this batch size (at least one when tokens > 0)."""
        if tokens <= 0:
            return 0
        per_step = self.batch_size * (seq_len or self.seq_len)
        return max(1, round(tokens / per_step))

    def checkpoint_interval(self, steps: int) -> int:
        """Steps between checkpoints of a stage of `steps` steps: `checkpoint_every`, or less so that
        the stage writes `min_checkpoints` (and a kill loses at most about 1/`min_checkpoints` of it)."""
        return max(1, min(self.checkpoint_every or steps, steps // max(1, self.min_checkpoints)))

    def with_overrides(self, overrides: dict[str, str]) -> "Budget":
        """A copy with fields replaced from strings (`'2e6'`, `'256'`), each checked and converted."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        values: dict[str, object] = {}
        for key, raw in overrides.items():
            if key not in fields:
                raise ValueError(f"unknown budget field {key!r}; known: {', '.join(fields)}")
            kind = type(getattr(self, key))
            try:
                values[key] = int(float(raw)) if kind is int else float(raw)
            except ValueError:
                raise ValueError(f"budget field {key} needs a number, got {raw!r}") from None
            if values[key] < 0:
                raise ValueError(f"budget field {key} must be >= 0, got {raw!r}")
        return dataclasses.replace(self, **values)


BUDGETS: dict[str, Budget] = {
    "quick": Budget(),
    "study": Budget(
        seq_len=1024,
        batch_size=16,
        heldout_tokens=262_144,
        probe_eval_tokens=65_536,
        stage1_tokens=10_485_760,
        probe_tokens=524_288,
        stage2_tokens=20_971_520,
        stage3_tokens=0,
        warmup_steps=50,
        kl_chunk_tokens=4096,
        checkpoint_every=250,
    ),
    "standard": Budget(
        seq_len=1024,
        batch_size=16,
        heldout_tokens=262_144,
        probe_eval_tokens=65_536,
        stage1_tokens=20_000_000,
        probe_tokens=20_000_000,
        stage2_tokens=200_000_000,
        stage3_tokens=20_000_000,
        stage3_seq_len=4096,
        warmup_steps=100,
        kl_chunk_tokens=4096,
        checkpoint_every=500,
    ),
    "paper": Budget(
        seq_len=512,
        batch_size=96,
        heldout_tokens=1_048_576,
        probe_eval_tokens=262_144,
        stage1_tokens=100_000_000,
        probe_tokens=200_000_000,
        stage2_tokens=600_000_000,
        stage3_tokens=0,
        warmup_steps=200,
        kl_chunk_tokens=8192,
        checkpoint_every=1000,
    ),
}


def get_budget(name: str, overrides: dict[str, str] | None = None) -> Budget:
    """A named preset with optional overrides."""
    if name not in BUDGETS:
        raise ValueError(f"unknown budget {name!r}; choose from {', '.join(BUDGETS)}")
    return BUDGETS[name].with_overrides(overrides or {})
