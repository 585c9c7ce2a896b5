"""`hyla info`: architecture facts and cache arithmetic."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from hyla.cli import app
from hyla.runtime.config import HybridConfig
from hyla.runtime.info import cache_sizes, describe, parameter_count
from tests.tiny_models import tiny_teacher


def test_cache_sizes_follow_layer_types() -> None:
    teacher = tiny_teacher("llama")
    hybrid = HybridConfig.from_teacher(teacher.config, layer_types=["gdn", "attention", "gdn", "gdn"])
    sizes = cache_sizes(hybrid, kv_dtype=torch.bfloat16, state_dtype=torch.float32)
    assert sizes.kv_bytes_per_token == 2 * 1 * 2 * 16 * 2
    assert sizes.state_bytes_per_sequence == 3 * (4 * 16 * 16 * 4 + 3 * 4 * 16 * 3 * 2)
    teacher_sizes = cache_sizes(HybridConfig.from_teacher(teacher.config), kv_dtype=torch.bfloat16)
    assert teacher_sizes.kv_bytes_per_token == 4 * sizes.kv_bytes_per_token
    assert teacher_sizes.state_bytes_per_sequence == 0


def test_parameter_count_matches_teacher() -> None:
    teacher = tiny_teacher("qwen3")
    assert parameter_count(HybridConfig.from_teacher(teacher.config)) == teacher.num_parameters()


@pytest.mark.slow
def test_info_smollm2() -> None:
    result = CliRunner().invoke(app, ["info", "smollm2-135m", "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    assert (facts["layers"], facts["heads"], facts["kv_heads"], facts["head_dim"]) == (30, 9, 3, 64)
    assert facts["layer_types"] == "A" * 30
    assert 134e6 < facts["parameters"] < 136e6
    assert facts["kv_bytes_per_token"] == 2 * 30 * 3 * 64 * 2


def test_describe_tiny_hybrid() -> None:
    hybrid = HybridConfig.from_teacher(tiny_teacher("llama").config, layer_types=["gdn", "attention", "gla", "gdn"])
    facts = describe(hybrid)
    assert facts["architecture"] == "hybrid" and facts["layer_types"] == "DALD"
    assert facts["softmax_layers"] == [1]


def test_dir_without_config_is_rejected(tmp_path) -> None:
    from hyla.runtime.load_errors import ModelLoadError
    from hyla.runtime.locate import resolve

    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve(tmp_path)
