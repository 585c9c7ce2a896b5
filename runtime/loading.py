"""Loading models (HF dirs, hub ids, GGUF files, converted hybrids, aliases: see `hyla.runtime.locate`).

What cannot be loaded raises `ModelLoadError` (see `hyla.runtime.load_errors`) with a one-line message.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from hyla.runtime.load_errors import ModelLoadError, ModelNotFound
from hyla.runtime.locate import resolve
from hyla.runtime.weights import check_weights

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def export_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF file into an fp32 HF dir at `out` (written atomically), so later loads take seconds."""
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


def _reason(exc: BaseException) -> str:
    """The first line of the innermost cause of `exc` (its own type name when that line is empty)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _config(path: str) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError, StrictDataclassError) as exc:
        if Path(path).is_dir():
            raise ModelLoadError(f"bad config in {path}: {_reason(exc)}") from exc
        raise ModelNotFound(f"cannot load {path} from the hub: {_reason(exc)}") from exc


def load_config(name: str | os.PathLike[str]) -> PretrainedConfig:
    """The config of any loadable model (a converted hybrid's included); `ModelLoadError` if unusable."""
    return _config(resolve(name))


def check_model(name: str | os.PathLike[str]) -> PretrainedConfig:
    """The config, once a local model's weights are found readable and shaped to fit it (headers only)."""
    path = resolve(name)
    config = _config(path)
    if Path(path).is_dir():
        check_weights(Path(path), config)
    return config


def load_tokenizer(name: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """The tokenizer saved with a model; `ModelLoadError` when its files are missing or unreadable."""
    path = resolve(name)
    if Path(path).is_dir() and not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
        raise ModelLoadError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {path}: {_reason(exc)}") from exc
    _skip_bpe_cleanup(tok)
    return tok


def _skip_bpe_cleanup(tok: PreTrainedTokenizerBase) -> None:
    """A BPE tokenizer whose config asks for `clean_up_tokenization_spaces` gets it turned off: the
    tokenizer ignores it on every decode anyway (the clean-up would corrupt BPE text) and warns that
    it does, which would be the first line a server prints on its first request."""
    backend = getattr(tok, "backend_tokenizer", None)
    if (
        tok.clean_up_tokenization_spaces
        and type(getattr(backend, "model", None)).__name__ == "BPE"
        and not getattr(tok, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
    ):
        tok.clean_up_tokenization_spaces = False


def load_model(
    name: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> PreTrainedModel:
    """Load a teacher or a converted hybrid in eval mode; `ModelLoadError` (one line) if it cannot be."""
    path = resolve(name)
    check_model(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise ModelLoadError(f"cannot load the weights of {path}: {_reason(exc)}") from exc
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


def default_dtype(device: str) -> str:
    """The weights dtype `auto` means on `device`: bfloat16 on CUDA, float32 on CPU."""
    return "bfloat16" if device.startswith("cuda") else "float32"


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
