"""Fast checks of a model dir's weight files: present, readable, shaped as the config needs.

Only safetensors headers are read (a few KB), so a truncated, garbled or mismatched checkpoint
is reported in milliseconds, before any loading starts. Only `check_weights` imports torch.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from hyla.runtime.load_errors import ModelLoadError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

SAFETENSORS_INDEX = "model.safetensors.index.json"


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors header; `ModelLoadError` if the file cannot hold its tensors."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else size
        if length > size - 8:
            raise ModelLoadError(f"{path}: truncated or not a safetensors file ({size:,} bytes)")
        try:
            header = json.loads(f.read(length))
            tensors = {k: v for k, v in header.items() if k != "__metadata__"}
            end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
            shapes = {k: [int(n) for n in v["shape"]] for k, v in tensors.items()}
        except (UnicodeDecodeError, ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise ModelLoadError(f"{path}: garbled safetensors header") from None
    if 8 + length + end > size:
        needed = 8 + length + end
        raise ModelLoadError(f"{path}: truncated safetensors file ({size:,} bytes, its header needs {needed:,})")
    return shapes


def checkpoint_shapes(model_dir: Path) -> dict[str, list[int]] | None:
    """Shapes of all tensors of a safetensors checkpoint, None for a readable PyTorch `.bin` one.

    Raises `ModelLoadError` when the dir has no weights or a weight file is missing or unreadable.
    """
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ModelLoadError(f"{index}: garbled index") from None
        missing = [name for name in files if not (model_dir / name).is_file()]
        if missing:
            raise ModelLoadError(
                f"{model_dir}: weight file(s) {', '.join(missing)} named by {SAFETENSORS_INDEX} are missing"
            )
        return {k: v for name in files for k, v in safetensors_shapes(model_dir / name).items()}
    if (model_dir / "model.safetensors").is_file():
        return safetensors_shapes(model_dir / "model.safetensors")
    if (model_dir / "pytorch_model.bin").is_file():
        if not zipfile.is_zipfile(model_dir / "pytorch_model.bin"):
            raise ModelLoadError(f"{model_dir / 'pytorch_model.bin'}: truncated or not a PyTorch checkpoint")
        return None
    raise ModelLoadError(f"{model_dir}: no weights (model.safetensors, {SAFETENSORS_INDEX} or pytorch_model.bin)")


def check_weights(model_dir: Path, config: PretrainedConfig) -> None:
    """`ModelLoadError` unless the dir's weights are readable and every tensor the model shares with
    them (by name, with or without the base model's prefix) has the shape `config` gives it."""
    import torch
    from transformers import AutoModelForCausalLM

    shapes = checkpoint_shapes(model_dir)
    if shapes is None:
        return
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    prefix = f"{model.base_model_prefix}."
    expected: dict[str, list[int]] = {}
    for name, tensor in model.state_dict().items():  # a checkpoint of the base model lacks the prefix
        expected[name] = expected[name.removeprefix(prefix)] = list(tensor.shape)
    if not expected.keys() & shapes.keys():
        raise ModelLoadError(f"{model_dir}: no tensor in the weights belongs to a {type(model).__name__}")
    for name, shape in expected.items():
        if name in shapes and shapes[name] != shape:
            raise ModelLoadError(f"{model_dir}: tensor {name} has shape {shapes[name]}, the config needs {shape}")
