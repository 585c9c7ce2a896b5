"""Tiny random teachers of the supported families, for fast tests."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel, Qwen2Config, Qwen3Config

FAMILIES = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}


def tiny_teacher(family: str = "llama", layers: int = 4, seed: int = 0, **overrides: object) -> PreTrainedModel:
    """A random 4-layer teacher: hidden 64, 4 query heads, 2 KV heads (GQA), vocab 128."""
    kwargs: dict[str, object] = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=family != "llama",
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if family == "llama":
        kwargs["rope_parameters"] = {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    kwargs.update(overrides)
    config = FAMILIES[family](**kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    with torch.no_grad():  # random biases and norm weights, so a dropped term shows up in the logits
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def tiny_teacher_dir(path: str | os.PathLike[str], family: str = "llama", layers: int = 2, seed: int = 0) -> Path:
    """Save a tiny random teacher with the real SmolLM2 tokenizer (vocab 49152) as an HF dir at `path`.

    For tests that need text in and text out (lm-eval, serving) without loading the real weights.
    """
    from hyla.runtime.loading import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    model = tiny_teacher(
        family, layers, seed, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    path = Path(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


TOKENIZER_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Serving hybrid models is fun. 🙂 🚀 café naïve 日本語",
    "Once upon a time there was a tiny model that wrote tiny stories.",
    "1 2 3 4 5 6 7 8 9 10, the end.",
]


def tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE trained in-process (ids 0/1/2 = <pad>/<s>/</s>); emojis span several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TOKENIZER_CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def random_tokens(n: int, seed: int) -> list[int]:
    """`n` token ids of the tiny vocabulary (above the special ids), seeded."""
    return torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
