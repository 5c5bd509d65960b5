"""The report's command on hand-written run folders: what it reads, and how it refuses a folder
that is missing, incomplete or malformed (one `error: ...` line naming the file, exit 2)."""

import json
from pathlib import Path

import pytest

from eval.report import main as report_main


def _run_folder(folder: Path, name: str) -> Path:
    """The files of an evaluated run, with only the fields the report reads."""
    run = folder / name
    (run / "eval").mkdir(parents=True)
    config = {
        "preset": "MoE-4",
        "model": {
            "layers": ["lstm", "moe", "lstm"],
            "moe": {"n_experts": 4, "expert_hidden": 16, "k": 2, "router": "noisy_topk"},
        },
        "ops_per_timestep": 1e6,
        "params_excl_embedding_softmax": 2e6,
        "total_params": 3e6,
        "data": {"recipe_id": "abc", "vocab_sha256": "def"},
    }
    (run / "config.json").write_text(json.dumps(config, indent=2))
    metrics = [
        {"kind": "train", "step": 10, "tokens": 400, "elapsed": 2.0},
        {"kind": "valid", "step": 10, "tokens": 400, "valid_ppl": 50.0},
    ]
    # The last line cut short, as a killed run leaves it: skipped.
    (run / "metrics.jsonl").write_text("\n".join(map(json.dumps, metrics)) + '\n{"kind": "tr')
    layer = {"cv_load": 0.1, "cv_importance": 0.2, "max_over_mean_load": 1.5, "unused_experts": 0}
    evaluation = {
        "tokens_trained": 400,
        "perplexity": 40.0,
        "tokens": 1000,
        "split": "test",
        "moe_layers": [{**layer, "tokens_per_expert": [1, 2, 3, 4]}],
    }
    (run / "eval" / "perplexity.json").write_text(json.dumps(evaluation, indent=2))
    return run


@pytest.fixture
def runs(tmp_path):
    return [_run_folder(tmp_path, "a"), _run_folder(tmp_path, "b")]


def _report(capsys, runs, out) -> tuple[int, str]:
    capsys.readouterr()
    code = report_main([*map(str, runs), "--out", str(out)])
    return code, capsys.readouterr().err


def test_report_of_two_runs(runs, tmp_path, capsys):
    code, _ = _report(capsys, runs, tmp_path / "report")
    assert code == 0
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert [m["name"] for m in summary["models"]] == ["a", "b"]
    assert summary["models"][0]["tokens_per_s"] == 200.0


@pytest.mark.parametrize("name", ["config.json", "eval/perplexity.json"])
def test_invalid_json_is_an_error_that_names_the_file(runs, tmp_path, capsys, name):
    path = runs[1] / name
    path.write_text(path.read_text().replace(",", "", 1))  # Expecting ',' delimiter
    code, err = _report(capsys, runs, tmp_path / "report")
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {path} is not valid JSON (Expecting ',' delimiter: line ")
    assert not (tmp_path / "report").exists()


def test_missing_or_incomplete_runs_exit_2(runs, tmp_path, capsys):
    code, err = _report(capsys, [runs[0], tmp_path / "nowhere"], tmp_path / "report")
    assert code == 2 and err == (
        f"error: {tmp_path / 'nowhere' / 'config.json'} not found: {tmp_path / 'nowhere'} is"
        " not a run folder (lstm_moe.train writes one)\n"
    )
    (runs[1] / "eval" / "perplexity.json").unlink()
    code, err = _report(capsys, runs, tmp_path / "report")
    assert code == 2 and "eval.perplexity" in err and err.count("\n") == 1
    config = json.loads((runs[0] / "config.json").read_text())
    del config["total_params"]
    (runs[0] / "config.json").write_text(json.dumps(config))
    code, err = _report(capsys, runs[:1], tmp_path / "report")
    assert code == 2 and err.startswith(f"error: {runs[0]}: config.json, metrics.jsonl or")
    assert "'total_params'" in err and err.count("\n") == 1


def test_runs_on_different_data_exit_2(runs, tmp_path, capsys):
    config = json.loads((runs[1] / "config.json").read_text())
    config["data"]["recipe_id"] = "another"
    (runs[1] / "config.json").write_text(json.dumps(config))
    code, err = _report(capsys, runs, tmp_path / "report")
    assert code == 2 and "not comparable" in err and err.count("\n") == 1


def test_runs_trained_for_other_budgets_exit_2(runs, tmp_path, capsys):
    for run, tokens in zip(runs, (1000, 2000), strict=True):
        config = json.loads((run / "config.json").read_text())
        config["train"] = {"max_tokens": tokens, "max_steps": None, "max_seconds": None}
        (run / "config.json").write_text(json.dumps(config))
    code, err = _report(capsys, runs, tmp_path / "report")
    assert code == 2 and err.count("\n") == 1
    assert "were not trained alike (max_tokens 2000 vs 1000)" in err and "not comparable" in err


def test_runs_scored_on_other_amounts_of_test_exit_2(runs, tmp_path, capsys):
    evaluation = json.loads((runs[1] / "eval" / "perplexity.json").read_text())
    evaluation["tokens"] = 500  # eval.perplexity --max_tokens
    (runs[1] / "eval" / "perplexity.json").write_text(json.dumps(evaluation))
    code, err = _report(capsys, runs, tmp_path / "report")
    assert code == 2 and "not evaluated alike (tokens 500 vs 1000)" in err


def test_k1_against_k4_table_when_the_runs_hold_both(runs, tmp_path, capsys):
    for run, (router, k) in zip(runs, (("switch", 1), ("noisy_topk", 4)), strict=True):
        config = json.loads((run / "config.json").read_text())
        config["model"]["moe"].update(router=router, k=k)
        (run / "config.json").write_text(json.dumps(config))
    code, _ = _report(capsys, runs, tmp_path / "report")
    assert code == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "k=1 vs k=4 (the same data, tokens and ops/timestep):" in report
    assert "| a | switch | 1 | 4 experts × 16, k=1 (switch) | 40.00 |" in report
    assert "| b | noisy_topk | 4 |" in report


def test_no_k_table_without_both(runs, tmp_path, capsys):
    code, _ = _report(capsys, runs, tmp_path / "report")  # both k=2
    assert code == 0 and "k=1 vs k=4" not in (tmp_path / "report" / "report.md").read_text()
