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
    `enable_prefix_caching` keeps computed KV blocks and linear-state snapshots for later requests
    sharing a prefix; snapshots are taken every `prefix_checkpoint_interval` prompt tokens (a multiple
    of `block_size`; default 32 blocks, 512 tokens at the default block size) and at prompt ends.
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
    async_scheduling: bool | None = None
    """Schedule and queue each decode step before the previous one's tokens reach the host (None:
    on CUDA only, where it hides the host's work behind the device's)."""
    enable_prefix_caching: bool = True
    prefix_checkpoint_interval: int | None = None

    @property
    def checkpoint_interval(self) -> int:
        return self.prefix_checkpoint_interval or 32 * self.block_size

    def __post_init__(self) -> None:
        parse_dtype(self.dtype)
        parse_dtype(self.state_dtype)
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        interval = self.prefix_checkpoint_interval
        if interval is not None and (interval < 1 or interval % self.block_size):
            raise ValueError(f"prefix_checkpoint_interval must be a positive multiple of block_size "
                             f"{self.block_size}, got {interval}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
