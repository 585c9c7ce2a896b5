"""`hyla eval study`: real tiny conversions evaluated into one JSON each, then tabulated and plotted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hyla.cli import app
from hyla.convert.pipeline import ConvertOptions, convert
from hyla.evals.prepare import prepare_data
from tests.test_convert_helpers import ESSENTIAL, copy_corpus, single_thread, teacher_dir, tiny_overrides

SMALL = ["--tasks", "arc_easy,niah_single", "--limit", "2", "--recall-lengths", "512", "--recall-samples", "1",
         "--contexts", "32", "--batches", "1", "--new-tokens", "3", "--cache-memory", "16MiB"]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("study")
    with pytest.MonkeyPatch.context() as mp, single_thread():
        mp.setenv("HYLA_CACHE", str(root / "cache"))
        teacher = teacher_dir(root / "teacher", essential=ESSENTIAL)
        copy_corpus(root / "corpus.txt")
        base = dict(teacher=str(teacher), data=str(root / "corpus.txt"), softmax_layers=1, overrides=tiny_overrides(),
                    quiet=True)
        convert(ConvertOptions(out=root / "kl-guided-1", **base))
        convert(ConvertOptions(out=root / "uniform-1", selection="uniform", stage1_from=str(root / "kl-guided-1"), **base))
        prepare_data(["arc_easy"], fetch=False, quiet=True)
        args = ["eval", "study", str(root / "results"), *SMALL]
        for model in (teacher, root / "kl-guided-1", root / "uniform-1"):
            args += ["--model", str(model)]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        yield root


def test_one_json_per_model_with_conversion_scores_and_speed(study: Path) -> None:
    results = study / "results"
    kl = json.loads((results / "kl-guided-1.json").read_text())
    report = json.loads((study / "kl-guided-1" / "conversion_report.json").read_text())
    assert kl["method"] == "kl-guided" and kl["softmax_layers"] == [ESSENTIAL] and kl["ratio"] == 0.25
    assert kl["heldout"]["kl"] == report["heldout"]["result"]["kl"]
    assert kl["conversion"]["budget"]["stage2_tokens"] == report["budget"]["stage2_tokens"]
    assert set(kl["tasks"]) == {"arc_easy/acc_norm"} and kl["core_average"] == kl["tasks"]["arc_easy/acc_norm"]
    assert set(kl["recall"]["niah_single"]) == {"score", "len_512"}
    assert kl["decode_tok_s"]["b1@32"] > 0
    assert "--model " + str(study / "kl-guided-1") in kl["command"]
    teacher = json.loads((results / "teacher.json").read_text())
    assert teacher["method"] == "teacher" and teacher["softmax_layers"] == [0, 1, 2, 3]


def test_summary_table_comparison_and_plot(study: Path) -> None:
    results = study / "results"
    summary = json.loads((results / "summary.json").read_text())
    assert [m["method"] for m in summary["models"]] == ["teacher", "kl-guided", "uniform"]
    assert summary["models"][0]["heldout"]["ppl"] > 1  # the teacher's, from the conversions' reports
    [check] = summary["kl_guided_vs_uniform"]
    assert check["ratio"] == 0.25 and check["lower_kl"] is True  # kl-guided keeps the essential layer
    assert set(summary["teacher_recovery"]) == {"kl-guided-1", "uniform-1"}
    readme = (results / "README.md").read_text()
    assert "| kl-guided-1 | kl-guided | 1/4 (25.0%) | 1 |" in readme and "| 25.0% | yes |" in readme
    assert "Budget of every conversion" in readme and (results / "quality_vs_ratio.png").stat().st_size > 10_000

    (results / "NOTES.md").write_text("What these runs show, in words.")
    again = CliRunner().invoke(app, ["eval", "study", str(results)])  # regenerate from the JSONs alone
    assert again.exit_code == 0, again.output
    assert (results / "README.md").read_text() == readme.replace(
        "from the model JSONs here.\n\n", "from the model JSONs here.\n\nWhat these runs show, in words.\n\n")


def test_an_empty_folder_is_a_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["eval", "study", str(tmp_path / "none")])
    assert result.exit_code == 2 and "holds no model JSONs" in result.output


def test_unsupported_recall_lengths_are_a_clear_error(study: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["eval", "study", str(tmp_path / "out"), "--model", str(study / "teacher"),
                                      "--tasks", "niah_single", "--recall-lengths", "128", "--cache-memory", "16MiB"])
    assert result.exit_code == 2 and "unsupported recall lengths [128]" in result.output
