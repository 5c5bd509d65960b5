"""eval.compare: the grid it expands, the FLOPs it matches, reuse of finished runs after a
kill, and the report it writes (or refuses to write) from the runs."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest

from eval import compare, compare_report
from eval.compare_grid import (
    BACKBONES,
    DENSE,
    ROUTERS,
    GridConfig,
    RunSpec,
    expand_grid,
    expert_hidden,
    experts_shown,
    left_out,
)
from lstm_moe.fields import apply_overrides, split_overrides
from lstm_moe.presets import PRESETS, model_size
from tests.translation.conftest import make_parallel_dataset

# ---------------------------------------------------------------------------------- the grid


def test_default_grid_expands_to_the_expected_runs():
    runs = expand_grid(GridConfig())
    names = [r.name for r in runs]
    assert len(names) == len(set(names)) == 29
    lm_lstm = [r.name for r in runs if r.setting == ("lm", "lstm")]
    assert lm_lstm == [
        "lm-lstm-dense-s1",
        "lm-lstm-top1-cf1.0-e32-s1",
        "lm-lstm-top1-cf1.25-e32-s1",
        "lm-lstm-top2-e32-s1",
        "lm-lstm-top4-e32-s1",
        # the experts axis: E = 32 is the run above, not a second one
        "lm-lstm-top1-cf1.25-e4-s1",
        "lm-lstm-top1-cf1.25-e256-s1",
        "lm-lstm-top4-e4-s1",
        "lm-lstm-top4-e256-s1",
    ]
    # Expert choice only where no causal layer would route by it: the Transformer encoder.
    assert [r.name for r in runs if r.router == "ec"] == ["translation-transformer-ec-e32-s1"]
    assert len(left_out(GridConfig())) == 3
    # Translation has no experts axis by default: five routers and dense, ec where it can.
    assert sum(r.task == "translation" for r in runs) == 5 + 6


def test_heat_maps_only_for_the_runs_the_report_shows():
    grid = GridConfig(seeds=(1, 2), distill=True)
    shown = [r.name for r in expand_grid(grid) if experts_shown(grid, r)]
    assert shown == [
        f"{task}-{arch}-{router}-e32-s1"
        for task in ("lm", "translation")
        for arch in ("lstm", "transformer")
        for router in ("top1-cf1.25", "top4")
    ]
    for spec in expand_grid(grid):
        experts = compare.eval_args(grid, spec).get("experts")
        if spec.router == DENSE:
            assert experts is None
        else:
            assert ("--no_heatmaps" in experts) != experts_shown(grid, spec)


def test_seeds_and_narrowing_multiply_and_filter():
    grid = GridConfig(
        tasks=("lm",), archs=("transformer",), routers=(DENSE, "top4"), experts=(), seeds=(1, 2)
    )
    assert [r.name for r in expand_grid(grid)] == [
        "lm-transformer-dense-s1",
        "lm-transformer-dense-s2",
        "lm-transformer-top4-e32-s1",
        "lm-transformer-top4-e32-s2",
    ]
    with pytest.raises(ValueError, match="unknown router 'top3'"):
        GridConfig(routers=("top3",))
    with pytest.raises(ValueError, match="unknown tasks"):
        GridConfig(tasks=("vision",))


@pytest.mark.parametrize(
    ("setting", "widths"),
    [
        # LSTM LM: the two 64-cell LSTMs the MoE replaces spend as much as 512 hidden units.
        (("lm", "lstm"), {"top1-cf1.0": 512, "top1-cf1.25": 512, "top2": 256, "top4": 128}),
        (("lm", "transformer"), {"top1-cf1.25": 256, "top2": 128, "top4": 64}),
        (("translation", "transformer"), {"top1-cf1.25": 256, "top4": 64, "ec": 128}),
    ],
)
def test_expert_width_is_the_dense_width_over_experts_per_token(setting, widths):
    for label, width in widths.items():
        assert expert_hidden(BACKBONES[setting], ROUTERS[label]) == width
        assert ROUTERS[label].experts_per_token * width == BACKBONES[setting].total_hidden


def _lstm_lm_config(spec: RunSpec):
    """The LMConfig lstm_moe.train builds from the run's model arguments."""
    preset, *rest = spec.model_args()
    _, overrides = split_overrides(rest)
    model_fields = {f.name for f in dataclasses.fields(PRESETS["MoE-32"])} | {
        f.name for f in dataclasses.fields(PRESETS["MoE-32"].moe)
    }
    config = PRESETS[preset.split("=", 1)[1]]
    return apply_overrides(config, {k: v for k, v in overrides.items() if k in model_fields})


def test_every_lstm_lm_run_spends_the_dense_ops_on_its_layers_but_the_gate():
    """Table 7's matching at the comparison's width: every router's expert ops per token
    equal the two LSTMs they replace, so total ops differ by the gating product alone."""
    d_model, n_experts = 64, 32
    dense = model_size(_lstm_lm_config(RunSpec("lm", "lstm", DENSE, 0, 1)))["ops_per_timestep"]
    for label, spec in ROUTERS.items():
        if spec.sees_whole_batch:
            continue
        config = _lstm_lm_config(RunSpec("lm", "lstm", label, n_experts, 1))
        assert (config.moe.k, config.moe.expert_hidden) == (
            spec.experts_per_token,
            512 // spec.experts_per_token,
        )
        gate = (2 if config.moe.router == "noisy_topk" else 1) * d_model * n_experts
        ops = model_size(config)["ops_per_timestep"]
        assert ops - gate == dense, label


def test_active_parameters_and_all_to_all_bytes_by_hand():
    row = {
        "total_params": 1_000_000,
        "moe_layers": [{"fraction_dropped": 0.0}, {"fraction_dropped": 0.5}],
    }
    moe = {"d_model": 8, "expert_hidden": 16, "n_experts": 10, "k": 2, "router": "switch"}
    # 2 layers x (10 - 2) unused experts x 2·8·16 parameters
    assert compare_report.active_params(row, {"moe": moe}) == 1_000_000 - 2 * 8 * 256
    # kept rows per token 2 + 1, each 8 float32 there and back, 3 of 4 leave the rank
    assert compare_report.all_to_all_bytes(row, {"moe": moe}, 4) == 3 * 8 * 4 * 2 * 0.75
    assert compare_report.all_to_all_bytes(row, {"moe": moe}, 1) == 0.0
    ec = {**moe, "router": "expert_choice", "capacity_factor": 2.0}
    assert compare_report.experts_per_token(ec) == 2.0


def test_seed_spread_decides_what_is_beyond_it():
    a = {"seeds": [1, 2], "quality_range": (10.0, 11.0)}
    assert compare_report.beyond_spread(a, {"seeds": [1, 2], "quality_range": (11.5, 12.0)})
    assert not compare_report.beyond_spread(a, {"seeds": [1, 2], "quality_range": (10.5, 12.0)})
    assert not compare_report.beyond_spread(a, {"seeds": [1], "quality_range": (20.0, 20.0)})


# ------------------------------------------------------------------- the driver, end to end


def _tiny_grid_args(out: Path, lm_data: Path, nmt_data: Path | None = None) -> list[str]:
    data = f"lm={lm_data}" + (f",translation={nmt_data}" if nmt_data else "")
    return [
        f"--out={out}",
        f"--tasks={'lm,translation' if nmt_data else 'lm'}",
        "--archs=lstm,transformer" if nmt_data else "--archs=lstm",
        "--routers=dense,top1-cf1.25,top4",
        "--experts=",
        f"--data={data}",
        "--lm_tokens=2000",
        "--translation_tokens=1500",
        "--valid_points=2",
        "--valid_tokens=200",
        "--eval_tokens=300",
        "--eval_pairs=16",
        "--bleu_sentences=8",
        "--main_experts=4",
        "--quiet",
    ]


@pytest.fixture(scope="module")
def topic_corpus(tmp_path_factory):
    """The generated multi-topic corpus at its tiny size: its topics are known."""
    from data_prep.synthetic import PRESETS as CORPORA
    from data_prep.synthetic import prepare_synthetic

    return prepare_synthetic(CORPORA["tiny"], tmp_path_factory.mktemp("topics"))


def test_compare_trains_reports_and_reuses_after_a_kill(topic_corpus, tmp_path, capsys):
    out = tmp_path / "compare"
    args = _tiny_grid_args(out, topic_corpus)
    assert compare.main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["name"] for r in summary["runs"]] == [
        "lm-lstm-dense-s1",
        "lm-lstm-top1-cf1.25-e4-s1",
        "lm-lstm-top4-e4-s1",
    ]
    assert len({r["tokens_trained"] for r in summary["runs"]}) == 1
    report = (out / "report.md").read_text()
    assert "k=1 vs k=4 at E=4" in report and "| lstm | top4 | 4 | 4 × 128 |" in report
    # What the experts learned: the mutual information of topic and expert, per sparse run.
    assert "### What the experts of lm-lstm-top4-e4-s1 learned" in report
    assert "I(topic; expert) = **" in report
    assert all(
        r["name"].endswith("dense-s1") or (out / r["name"] / "eval" / "experts.json").is_file()
        for r in summary["runs"]
    )
    for name in ("valid-tokens-lm.png", "valid-seconds-lm.png", "cost-lm.png", "load-lm.png"):
        assert (out / name).stat().st_size > 1000
    assert 0 < summary["cost"]["overhead_fraction"] < 1
    first = {r["name"]: r["test_perplexity"] for r in summary["runs"]}

    # A kill: one run lost its evaluation, one its last checkpoint's progress and one never
    # reached its first checkpoint. The others are reused, these three finished again.
    dense, top1, top4 = (out / name for name in first)
    (dense / "eval" / "perplexity.json").unlink()
    record = json.loads((top1 / "compare.json").read_text())
    (top1 / "compare.json").write_text(json.dumps({**record, "finished": False}))
    shutil.rmtree(top4 / "eval")
    (top4 / "checkpoint.pt").unlink()
    record = json.loads((top4 / "compare.json").read_text())
    (top4 / "compare.json").write_text(json.dumps({**record, "finished": False}))
    capsys.readouterr()
    assert compare.main(args) == 0
    err = capsys.readouterr().err
    assert "[1/3] lm-lstm-dense-s1: " in err and "reused" not in err
    again = json.loads((out / "summary.json").read_text())
    got = {r["name"]: r["test_perplexity"] for r in again["runs"]}
    # Retrained from scratch or resumed at its end, every run scores what it scored.
    assert got == pytest.approx(first, rel=1e-6)
    capsys.readouterr()
    assert compare.main(args) == 0
    assert capsys.readouterr().err.count("reused") == 3


def test_a_folder_of_another_grid_is_refused(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "compare"
    args = [*_tiny_grid_args(out, tiny_dataset), "--routers=dense"]
    assert compare.main(args) == 0
    capsys.readouterr()
    assert compare.main([*args, "--lm_tokens=3000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a run with other arguments" in err


def test_the_report_refuses_runs_of_other_budgets(tiny_dataset, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert compare.main([*_tiny_grid_args(a, tiny_dataset), "--routers=dense"]) == 0
    assert (
        compare.main([*_tiny_grid_args(b, tiny_dataset), "--routers=top4", "--lm_tokens=1500"]) == 0
    )
    capsys.readouterr()
    runs = [a / "lm-lstm-dense-s1", b / "lm-lstm-top4-e4-s1"]
    assert compare_report.main([*map(str, runs), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not trained alike (max_tokens 1500 vs 2000)" in err


def test_equal_seconds_budget_trains_every_run_for_the_same_clock(tiny_dataset, tmp_path):
    out = tmp_path / "compare"
    args = [*_tiny_grid_args(out, tiny_dataset), "--budget=time", "--seconds=1.5"]
    assert compare.main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    for run in summary["runs"]:
        config = json.loads((out / run["name"] / "config.json").read_text())
        assert config["train"]["max_seconds"] == 1.5 and config["train"]["max_tokens"] is None
        # the engine stops at the first step that reaches the budget
        lines = (out / run["name"] / "metrics.jsonl").read_text().splitlines()
        elapsed = [e["elapsed"] for e in map(json.loads, lines) if e["kind"] == "train"]
        assert elapsed[-1] == run["wall_seconds"] >= 1.5 > elapsed[-2]
    # runs may train different numbers of tokens; the report still puts them side by side
    assert "k=1 vs k=4 at E=4" in (out / "report.md").read_text()


def test_compare_of_both_tasks_and_backbones(tiny_dataset, tmp_path):
    nmt = make_parallel_dataset(tmp_path / "nmt")
    out = tmp_path / "compare"
    assert compare.main(_tiny_grid_args(out, tiny_dataset, nmt)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["tasks"]) == {"lm", "translation"}
    assert {(r["task"], r["arch"]) for r in summary["runs"]} == {
        ("lm", "lstm"),
        ("lm", "transformer"),
        ("translation", "lstm"),
        ("translation", "transformer"),
    }
    assert all(r["sacrebleu"] is not None for r in summary["runs"] if r["task"] == "translation")


REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(
    not (REPO / ".venv" / ".installed").exists() or shutil.which("make") is None,
    reason="make compare runs in the project's .venv (make setup)",
)
def test_make_compare_on_a_tiny_grid(tiny_dataset, tmp_path):
    """The user's entry point, narrowed by its variables, on a tiny grid."""
    out = tmp_path / "compare"
    extra = [a for a in _tiny_grid_args(out, tiny_dataset) if a.split("=")[0] in TINY]
    result = subprocess.run(
        [
            "make",
            "-s",
            "-C",
            str(REPO),
            "compare",
            f"COMPARE_OUT={out}",
            "TASK=lm",
            "ARCH=transformer",
            "ROUTERS=dense,top1-cf1.25,top4",
            "EXPERTS=4",
            f"DATA={tiny_dataset}",
            "COMPARE_ARGS=" + " ".join(extra),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"wrote {out / 'report.md'} (3 runs)" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert {r["arch"] for r in summary["runs"]} == {"transformer"}


TINY = {
    "--lm_tokens",
    "--valid_points",
    "--valid_tokens",
    "--eval_tokens",
    "--main_experts",
    "--quiet",
}


def test_distilled_student_is_a_row_with_its_kept_share(tiny_dataset, tmp_path):
    out = tmp_path / "compare"
    args = [*_tiny_grid_args(out, tiny_dataset), "--routers=dense,top1-cf1.25", "--distill"]
    assert compare.main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["name"] for r in summary["runs"]][-1] == "lm-lstm-dense-from-top1-cf1.25-e4-s1"
    student_config = json.loads(
        (out / "lm-lstm-dense-from-top1-cf1.25-e4-s1" / "config.json").read_text()
    )
    assert student_config["task_config"]["teacher_run"].endswith("lm-lstm-top1-cf1.25-e4-s1")
    report = (out / "report.md").read_text()
    assert "| lstm | distilled ← top1-cf1.25 | – |" in report
    assert "distilled from top1-cf1.25 E=4: " in report


def _entry(label, router, test_nll, teacher=None):
    return {
        "arch": "lstm",
        "label": label,
        "router": router,
        "n_experts": 32 if router != "dense" or teacher else None,
        "quality": math.exp(test_nll),
        "test_nll": test_nll,
        "tokens_per_s": 1000.0,
        "teacher": teacher,
        "seeds": [1],
    }


def test_kept_share_line_on_switch_table_6_and_without_a_teacher_gain():
    # Switch Table 6, 1.1B -> 223M: neg. log perplexity dense -1.636, teacher -1.444,
    # student -1.580: (1.636 - 1.580) / (1.636 - 1.444) = 0.056 / 0.192 = 29 %.
    dense = _entry("dense", "dense", 1.636)
    teacher = _entry("top1-cf1.25 E=32", "top1-cf1.25", 1.444)
    student = _entry("dense ← top1-cf1.25 E=32", "dense", 1.580, teacher="top1-cf1.25")
    (line,) = compare_report.kvk_lines("lm", [dense, teacher, student])
    assert "distilled from top1-cf1.25 E=32: keeps 29% of its gain over dense" in line
    assert "head start" not in line
    # a student beyond its teacher says why
    ahead = _entry("dense ← top1-cf1.25 E=32", "dense", 1.400, teacher="top1-cf1.25")
    (line,) = compare_report.kvk_lines("lm", [dense, teacher, ahead])
    assert "keeps 123% of its gain" in line and "head start" in line
    # a teacher level with dense has no gain to keep: no ratio of two noises
    level = _entry("top1-cf1.25 E=32", "top1-cf1.25", 1.631)
    (line,) = compare_report.kvk_lines("lm", [dense, level, student])
    assert "keeps" not in line and "no gain to keep" in line
