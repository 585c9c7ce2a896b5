"""A tiny converted hybrid on disk (attention + Gated DeltaNet layers, SmolLM2 tokenizer) and hyla's
bf16 view of it: greedy tokens from hyla's engine and teacher-forced logits from hyla's model."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from hyla.convert.transfer import hybrid_from_teacher
from hyla.runtime.engine import LLMEngine
from hyla.runtime.engine_config import EngineConfig
from hyla.runtime.loading import load_tokenizer
from hyla.runtime.model import HybridForCausalLM
from hyla.runtime.sampling_params import SamplingParams
from tests.tiny_models import tiny_teacher

LAYER_TYPES = ["gdn", "attention", "gdn", "gdn"]
# vLLM's CPU kernels take head dims of 64 and up.
DIMS = dict(
    hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
    max_position_embeddings=2048,
)
LOGIT_SCALE = 12.0
"""Scales the LM head so greedy picks are decided by clear margins, not by near-ties of a flat
distribution over 49k tokens."""


def tiny_hybrid_dir(path: Path, family: str = "llama", layer_types: list[str] = LAYER_TYPES) -> Path:
    """Convert a random tiny teacher with fresh, randomised linear-attention parameters, and save it
    with the SmolLM2 tokenizer. Randomising conv, gates, decay and norms makes a wrongly mapped weight
    change the logits."""
    tok = load_tokenizer("smollm2-135m")
    teacher = tiny_teacher(
        family, len(layer_types), 0, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id, **DIMS,
    )
    hybrid = hybrid_from_teacher(teacher, layer_types)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in hybrid.named_parameters():
            if ".self_attn." in name and hybrid.config.layer_types[int(name.split(".")[2])] != "attention":
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)
        hybrid.lm_head.weight.mul_(LOGIT_SCALE)
    hybrid.save_pretrained(path)
    tok.save_pretrained(path)
    return path


PROMPT_REPEATS = (0, 1, 2, 4, 7, 12, 20, 30)


def prompts() -> list[str]:
    """Eight prompts from a few tokens to about 550."""
    text = "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun. "
    return [f"Story {i}: " + text * r + "Once upon a time" for i, r in enumerate(PROMPT_REPEATS)]


def hyla_greedy(model_dir: Path, texts: list[str], max_tokens: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, greedy output ids) from hyla's engine in bf16 (fp32 linear states, its default)."""
    engine = LLMEngine.from_config(EngineConfig(model=str(model_dir), dtype="bfloat16", cache_memory="512MiB"))
    outs = engine.generate(texts, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    return [(list(o.prompt_token_ids), list(o.outputs[0].token_ids)) for o in outs]


@functools.lru_cache(maxsize=4)
def hyla_model(model_dir: Path, dtype: torch.dtype) -> HybridForCausalLM:
    return HybridForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


def teacher_forced_logits(model_dir: Path, ids: list[int], dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """hyla's logits `[len(ids), vocab]` (as fp32) for one sequence, position t predicting t+1."""
    with torch.no_grad():
        return hyla_model(model_dir, dtype)(torch.tensor([ids])).logits[0].float()
