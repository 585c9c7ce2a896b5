"""`EngineConfig`: everything the serving engine needs to know to start."""

from __future__ import annotations

from dataclasses import dataclass

from hyla.runtime.loading import parse_dtype


@dataclass
class EngineConfig:
    """Model, device and the limits the scheduler and cache manager work within.

    `cache_memory` is the memory budget for the KV blocks and linear-state slots together: bytes
    (`"2GiB"`, `"512MiB"`, `"1000000"`) or a fraction of the free device memory (`"0.5"`).
    `max_num_batched_tokens` caps the tokens one engine step runs (prefill chunks + decode tokens).
    """

    model: str
    device: str = "cpu"
    dtype: str = "float32"
    state_dtype: str = "float32"
    max_model_len: int | None = None
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 1024
    block_size: int = 16
    cache_memory: str = "2GiB"
    seed: int = 0
    enforce_eager: bool = False
    """No CUDA graphs: every step runs eagerly (graphs are only used on CUDA anyway)."""

    def __post_init__(self) -> None:
        parse_dtype(self.dtype)
        parse_dtype(self.state_dtype)
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
