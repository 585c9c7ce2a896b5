"""Training text sampled from the teacher by hyla's own engine, to stretch a small real corpus.

Each sample continues a prompt cut from a real document: `prompt_tokens` tokens from a random
offset, then `max_new_tokens` sampled at `temperature` / `top_p` (EOS ends a sample early). A corpus
folder holds `samples.jsonl` (one `{"text", "source"}` row a sample, `text` being prompt and
continuation, `source` the SHA-1 of the document the prompt came from) and `meta.json` (the
settings and counts). Generation runs in rounds of `round_size` prompts appended to the file, so an
interrupted run resumes at the round it was in and a finished corpus is reused as is; rounds are
seeded by their index, so a resumed corpus equals an uninterrupted one. Exact duplicates and
degenerate samples (few distinct 4-grams) are dropped.

Held-out text stays real: `prepare_blocks` adds samples to the training split only and leaves out
every sample whose prompt came from a held-out document (`source` match).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from hyla.convert.jsonfile import write_json

SAMPLES = "samples.jsonl"
META = "meta.json"


@dataclass(frozen=True)
class SamplingPlan:
    """What a generated corpus is made of; its folder is reused only for the same plan."""

    teacher: str
    tokens: int
    data: str = "default"
    """The real text prompts are cut from (a `hyla convert --data` spec)."""
    prompt_tokens: int = 64
    max_new_tokens: int = 448
    temperature: float = 0.8
    top_p: float = 0.95
    round_size: int = 64
    seed: int = 0
    min_distinct_4grams: float = 0.3
    """Samples whose continuation has fewer distinct 4-grams than this share of its 4-grams are dropped."""

    def __post_init__(self) -> None:
        if self.tokens < 1 or self.prompt_tokens < 1 or self.max_new_tokens < 1 or self.round_size < 1:
            raise ValueError("tokens, prompt_tokens, max_new_tokens and round_size must be positive")
        if not 0 < self.top_p <= 1 or self.temperature < 0:
            raise ValueError("top_p must be in (0, 1] and temperature >= 0")

    def sampling(self) -> dict:
        """The settings that decide the text (all but the token target, which only says how much)."""
        return {k: v for k, v in asdict(self).items() if k != "tokens"}

    def same_corpus(self, other: dict) -> bool:
        """Whether `other` (a stored plan) samples the same text."""
        mine = self.sampling()
        return mine == {k: other.get(k) for k in mine}

    def default_folder(self) -> Path:
        """Where the corpus of this plan lives unless told otherwise: the cache, keyed by the settings."""
        from hyla.assets import cache_root

        key = json.dumps(self.sampling(), sort_keys=True)
        return cache_root() / "generated" / hashlib.sha1(key.encode()).hexdigest()[:16]

    def round_seed(self, index: int) -> int:
        """Seed of round `index`: its prompts, and (plus the sample's place) each sample's sampling."""
        return self.seed * 1_000_003 + index


def document_id(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def distinct_4gram_share(tokens: Sequence[int]) -> float:
    grams = [tuple(tokens[i : i + 4]) for i in range(len(tokens) - 3)]
    return len(set(grams)) / len(grams) if grams else 1.0


def round_prompts(docs: list[list[int]], plan: SamplingPlan, index: int) -> list[tuple[int, list[int]]]:
    """(document index, prompt tokens) of round `index`: documents long enough for a prompt, drawn
    with a generator seeded by the plan's seed and the round."""
    rng = random.Random(plan.round_seed(index))
    usable = [i for i, d in enumerate(docs) if len(d) >= plan.prompt_tokens]
    if not usable:
        raise ValueError(f"no document has the {plan.prompt_tokens} tokens a prompt needs")
    out = []
    for _ in range(plan.round_size):
        i = rng.choice(usable)
        start = rng.randrange(len(docs[i]) - plan.prompt_tokens + 1)
        out.append((i, docs[i][start : start + plan.prompt_tokens]))
    return out


def read_samples(folder: Path) -> Iterator[dict]:
    """The rows of a corpus folder's samples file (none when it has not been started)."""
    path = Path(folder) / SAMPLES
    if path.is_file():
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)


Generate = Callable[[list[list[int]], SamplingPlan, int], list[list[int]]]
"""Continuations (token ids) of prompts under a plan; the int is the round's seed."""


class GeneratedCorpus:
    """A folder of teacher samples, grown round by round to `plan.tokens` tokens."""

    def __init__(self, folder: Path, plan: SamplingPlan) -> None:
        self.folder = Path(folder)
        self.plan = plan
        self.meta = self._load_meta()

    def _load_meta(self) -> dict:
        path = self.folder / META
        if not path.is_file():
            return {"plan": asdict(self.plan), "rounds": 0, "samples": 0, "tokens": 0, "dropped": 0}
        meta = json.loads(path.read_text())
        if not self.plan.same_corpus(meta["plan"]):
            raise ValueError(
                f"{self.folder} holds a corpus sampled with other settings ({meta['plan']}); use another folder"
            )
        meta["plan"]["tokens"] = self.plan.tokens
        return meta

    @property
    def done(self) -> bool:
        return self.meta["tokens"] >= self.plan.tokens

    def build(
        self, docs: list[str], tokenizer, generate: Generate, progress: Callable[[int], None] | None = None
    ) -> dict:
        """Sample rounds until the corpus holds `plan.tokens` tokens (prompt + continuation); returns meta."""
        self.folder.mkdir(parents=True, exist_ok=True)
        seen = {document_id(row["text"]) for row in self._recorded_rows()}
        ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
        sources = [document_id(d) for d in docs]
        while not self.done:
            index = self.meta["rounds"]
            prompts = round_prompts(ids, self.plan, index)
            continuations = generate([p for _, p in prompts], self.plan, self.plan.round_seed(index))
            rows, added = [], 0
            for (doc, prompt), completion in zip(prompts, continuations):
                text = tokenizer.decode(prompt + completion, skip_special_tokens=True)
                key = document_id(text)
                if key in seen or distinct_4gram_share(completion) < self.plan.min_distinct_4grams:
                    self.meta["dropped"] += 1
                    continue
                seen.add(key)
                rows.append(json.dumps({"text": text, "source": sources[doc]}, ensure_ascii=False))
                added += len(prompt) + len(completion)
            with (self.folder / SAMPLES).open("a", encoding="utf-8") as f:
                f.write("".join(r + "\n" for r in rows))
            self.meta.update(
                rounds=index + 1, samples=self.meta["samples"] + len(rows), tokens=self.meta["tokens"] + added
            )
            write_json(self.folder / META, self.meta)
            if progress is not None:
                progress(added)
        return self.meta

    def _recorded_rows(self) -> list[dict]:
        """The rows of the recorded rounds; rows past them (written by a run killed mid-round) are
        dropped from the file."""
        rows = list(read_samples(self.folder))
        if len(rows) > self.meta["samples"]:
            rows = rows[: self.meta["samples"]]
            (self.folder / SAMPLES).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        return rows


def engine_sampler(engine) -> Generate:
    """A `Generate` running on a hyla `LLMEngine` (sample i of a round seeded with the round's seed + i)."""
    from hyla.runtime.sampling_params import SamplingParams

    def generate(prompts: list[list[int]], plan: SamplingPlan, seed: int) -> list[list[int]]:
        params = [
            SamplingParams(
                max_tokens=plan.max_new_tokens, temperature=plan.temperature, top_p=plan.top_p, seed=seed + i
            )
            for i in range(len(prompts))
        ]
        return [list(out.outputs[0].token_ids) for out in engine.generate(prompts, params)]

    return generate
