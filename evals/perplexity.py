"""Held-out perplexity and KL(teacher ‖ student) over fixed-length token blocks.

Blocks come from a text file (tokenised and packed) or from a conversion's held-out split
(`heldout.pt`, `[N, seq_len]` token ids). Both models see exactly the same blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase


@dataclass(frozen=True)
class HeldOutScore:
    """Mean next-token NLL (nats), its perplexity, and mean KL(teacher ‖ student) per token if a teacher was given."""

    tokens: int
    nll: float
    kl: float | None = None

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


def text_blocks(path: str | Path, tokenizer: PreTrainedTokenizerBase, seq_len: int, max_blocks: int | None = None) -> torch.Tensor:
    """A text file tokenised and cut into `[N, seq_len]` blocks (the tail is dropped)."""
    text = Path(path).read_text(encoding="utf-8")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"{path} has {ids.numel()} tokens, fewer than one block of {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)[:max_blocks]


def heldout_blocks(path: str | Path, max_blocks: int | None = None) -> torch.Tensor:
    """A conversion's held-out split: `heldout.pt` itself or a folder holding it."""
    path = Path(path)
    file = path / "heldout.pt" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no held-out split at {file}")
    blocks = torch.load(file)
    if blocks.dim() != 2:
        raise ValueError(f"{file} holds a tensor of shape {tuple(blocks.shape)}, expected [N, seq_len]")
    return blocks[:max_blocks]


@torch.inference_mode()
def score_blocks(
    student: PreTrainedModel,
    blocks: torch.Tensor,
    teacher: PreTrainedModel | None = None,
    batch_size: int = 4,
    quiet: bool = False,
) -> HeldOutScore:
    """Student NLL over every next-token prediction of the blocks; KL against the teacher if given."""
    if teacher is not None and teacher.config.vocab_size != student.config.vocab_size:
        raise ValueError("teacher and student vocabularies differ; KL needs the same tokenizer")
    device = next(student.parameters()).device
    nll_sum, kl_sum, count = 0.0, 0.0, 0
    for start in tqdm(range(0, len(blocks), batch_size), desc="held-out", disable=quiet):
        ids = blocks[start : start + batch_size].to(device)
        logp = torch.log_softmax(student(input_ids=ids).logits[:, :-1].float(), -1)
        nll_sum -= logp.gather(-1, ids[:, 1:, None]).sum().item()
        if teacher is not None:
            logq = torch.log_softmax(teacher(input_ids=ids.to(teacher.device)).logits[:, :-1].float(), -1).to(device)
            kl_sum += (logq.exp() * (logq - logp)).sum().item()
        count += ids[:, 1:].numel()
    return HeldOutScore(count, nll_sum / count, kl_sum / count if teacher is not None else None)
