"""Step 0: documents → teacher tokens → fixed-length blocks, split into train / held-out by document.

A data spec is `default` (the built-in offline corpus), a local path (`.txt`: documents separated by
a blank line; `.jsonl`: a `text` field per line; `.parquet`: a `text` column; a folder: all of those
inside it), or `hf:NAME[:config]` (a `datasets` hub dataset, streamed, `text` column). Tokenised blocks
are cached under `cache_root()/data/<key>/`, keyed by spec, file stamps, tokenizer and lengths.

`extra` names a corpus folder of teacher samples (`hyla corpus`, :mod:`hyla.convert.generated`):
its samples join the training split only, minus those whose prompt came from a held-out document.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from hyla.convert.corpus import builtin_documents
from hyla.convert.generated import META, document_id, read_samples
from hyla.assets import cache_root

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
CHARS_PER_TOKEN = 4  # rough, used only to decide how much of a streamed dataset to read


@dataclass
class TokenBlocks:
    """Packed `[N, seq_len]` int64 blocks of the train and held-out splits."""

    train: torch.Tensor
    heldout: torch.Tensor
    meta: dict


def _split_txt(text: str) -> list[str]:
    return [d.strip() for d in text.split("\n\n") if d.strip()]


def _read_file(path: Path) -> list[str]:
    if path.suffix == ".txt":
        return _split_txt(path.read_text(encoding="utf-8", errors="replace"))
    if path.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                row = json.loads(line)
                if "text" not in row:
                    raise ValueError(f"{path}:{n}: a jsonl row needs a 'text' field")
                docs.append(str(row["text"]))
        return docs
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise ValueError(f"{path}: a parquet file needs a 'text' column (has {table.column_names})")
        return [str(t) for t in table.column("text").to_pylist() if t]
    raise ValueError(f"{path}: unsupported data file; use {', '.join(TEXT_SUFFIXES)}")


def _local_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"{path} holds no {'/'.join(TEXT_SUFFIXES)} files")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"data path {path} does not exist (use 'default', a path or hf:NAME[:config])")
    return [path]


def _hub_documents(spec: str, max_chars: int) -> list[str]:
    """Stream `hf:NAME[:config]` (train split) until `max_chars` characters of `text` are read."""
    import datasets

    name, _, config = spec[3:].partition(":")
    stream = datasets.load_dataset(name, config or None, split="train", streaming=True)
    docs, total = [], 0
    for row in stream:
        if "text" not in row:
            raise ValueError(f"{spec}: rows need a 'text' field (have {sorted(row)})")
        docs.append(str(row["text"]))
        total += len(docs[-1])
        if total >= max_chars:
            break
    return docs


def _source_stamp(spec: str) -> str:
    if spec == "default" or spec.startswith("hf:"):
        return spec
    return json.dumps([(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in _local_files(Path(spec))])


def _extra_stamp(folder: Path) -> str:
    meta = folder / META
    if not meta.is_file():
        raise FileNotFoundError(f"{folder} is not a generated corpus (no {META}); make one with `hyla corpus`")
    return meta.read_text()


def read_documents(spec: str, max_tokens: int) -> list[str]:
    """The documents a data spec names."""
    if spec == "default":
        return builtin_documents()
    if spec.startswith("hf:"):
        return _hub_documents(spec, max_tokens * CHARS_PER_TOKEN)
    return [doc for f in _local_files(Path(spec).expanduser()) for doc in _read_file(f)]


def _tokenize(tokenizer: PreTrainedTokenizerBase, docs: list[str], eos: int) -> list[list[int]]:
    """Each document's tokens, then EOS."""
    return [seq + [eos] for seq in tokenizer(docs, add_special_tokens=False)["input_ids"]] if docs else []


def pack(docs: list[list[int]], seq_len: int) -> torch.Tensor:
    """Concatenate token lists and cut them into `[N, seq_len]` blocks (the tail is dropped)."""
    flat = torch.tensor([t for doc in docs for t in doc], dtype=torch.long)
    n = flat.numel() // seq_len
    return flat[: n * seq_len].view(n, seq_len)


def prepare_blocks(
    spec: str,
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    heldout_tokens: int,
    train_tokens: int,
    seed: int = 0,
    extra: str | None = None,
) -> TokenBlocks:
    """Tokenised, packed and split data for a spec, plus training-only samples from `extra` (cached on disk)."""
    vocab = hashlib.sha1(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:12]
    streamed = spec.startswith("hf:") and train_tokens  # how much of a hub dataset was read
    key_src = json.dumps([_source_stamp(spec), vocab, seq_len, heldout_tokens, seed, streamed])
    if extra:
        key_src += _extra_stamp(Path(extra))
    key = hashlib.sha1(key_src.encode()).hexdigest()[:16]
    folder = cache_root() / "data" / key
    if (folder / "meta.json").is_file():
        meta = json.loads((folder / "meta.json").read_text())
        return TokenBlocks(torch.load(folder / "train.pt"), torch.load(folder / "heldout.pt"), meta)
    docs = read_documents(spec, train_tokens + heldout_tokens)
    if not docs:
        raise ValueError(f"data {spec!r} holds no documents")
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    ids = _tokenize(tokenizer, docs, eos)
    order = list(range(len(ids)))
    random.Random(seed).shuffle(order)
    held, total = [], 0
    while order and total < heldout_tokens + seq_len:
        held.append(order.pop())
        total += len(ids[held[-1]])
    if not order:
        raise ValueError(
            f"data {spec!r} is too small: a held-out split of {heldout_tokens} tokens leaves no training data"
        )
    train_docs = [ids[i] for i in sorted(order)]
    extra_meta = {}
    if extra:
        held_sources = {document_id(docs[i]) for i in held}
        rows = list(read_samples(Path(extra)))
        kept = [row["text"] for row in rows if row["source"] not in held_sources]
        train_docs += _tokenize(tokenizer, kept, eos)
        extra_meta = {"extra": str(extra), "extra_samples": len(kept), "extra_left_out": len(rows) - len(kept)}
    heldout, train = pack([ids[i] for i in sorted(held)], seq_len), pack(train_docs, seq_len)
    heldout = heldout[: max(1, heldout_tokens // seq_len)]
    if train.shape[0] == 0:
        raise ValueError(f"data {spec!r} is too small for one training block of {seq_len} tokens")
    meta = {
        "spec": spec,
        "documents": len(ids),
        "heldout_documents": len(held),
        "train_tokens": train.numel(),
        "heldout_tokens": heldout.numel(),
        "seq_len": seq_len,
        "cache": str(folder),
        **extra_meta,
    }
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save(train, tmp / "train.pt")
    torch.save(heldout, tmp / "heldout.pt")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return TokenBlocks(train, heldout, meta)


class BatchStream:
    """Seeded batches over a set of blocks; batch `step` is the same whenever asked (resume-safe).

    `batch_size` is global: with `world` processes each rank gets rows `rank::world` of it, so a
    data-parallel step sees exactly the batch a single process would.
    """

    def __init__(self, blocks: torch.Tensor, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} is not divisible by {world} processes")
        self.blocks, self.batch_size, self.rank, self.world = blocks, batch_size, rank, world
        self.order = torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(seed))

    def __call__(self, step: int) -> torch.Tensor:
        idx = self.order[(torch.arange(self.batch_size) + step * self.batch_size) % self.blocks.shape[0]]
        return self.blocks[idx[self.rank :: self.world]]
