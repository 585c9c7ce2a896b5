"""Why a model cannot be loaded, as types whose message is one line (front ends print it as is)."""

from __future__ import annotations


class ModelLoadError(OSError):
    """A model's path, config, weights or tokenizer cannot be used; `exit_code` is what a CLI exits with."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)


class ModelNotFound(ModelLoadError, FileNotFoundError):
    """The name is no existing path, no alias and no reachable or cached hub repo."""

    exit_code = 2
