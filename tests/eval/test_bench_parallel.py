"""The expert-parallel benchmark's CLI writes the documented report, and its routing figures
follow §3.1: dropless, each expert computes k·b·d/n rows on average per step. The whole-model
benchmark's all-to-all bytes are exactly the rows the routing kept for other ranks, four times
over per MoE layer. (Speed itself is measured by `python -m eval.bench_parallel`, never
asserted here.)"""

import argparse
import json
import subprocess
import sys

import pytest

from eval.bench_parallel import main, summarise
from eval.bench_parallel_model import main as model_main
from eval.bench_parallel_model import ratios
from eval.bench_parallel_model import summarise as summarise_model

ROW_KEYS = (
    "ranks", "tokens_per_rank", "global_tokens", "n_experts", "k", "ms", "tokens_per_s",
    "all_to_all_ms", "bytes_sent_per_rank", "tokens_per_expert_mean", "tokens_per_expert_min",
    "tokens_per_expert_max", "expected_tokens_per_expert",
)  # fmt: skip


def test_a_step_lasts_as_long_as_its_slowest_rank():
    args = argparse.Namespace(tokens_per_rank=10, experts=4, k=2)
    ranks = [
        {"step_s": [0.1, 0.3, 0.2], "all_to_all_s": [0.0, 0.1, 0.2], "bytes_sent": [8, 8, 8],
         "all_to_all_calls_per_step": 4, "rows_per_expert": [18, 24, 30, 48]},
        {"step_s": [0.4, 0.1, 0.2], "all_to_all_s": [0.2, 0.1, 0.0], "bytes_sent": [4, 4, 4],
         "all_to_all_calls_per_step": 4, "rows_per_expert": [18, 24, 30, 48]},
    ]  # fmt: skip
    row = summarise(args, 2, ranks)
    assert row["ms"] == pytest.approx(300.0)  # median of the per-step maxima 0.4, 0.3, 0.2
    assert row["all_to_all_ms"] == pytest.approx(100.0)
    assert row["bytes_sent_per_rank"] == 6
    assert row["global_tokens"] == 20
    # 120 rows over 3 steps and 4 experts; k·b·d/n = 2·10·2/4.
    assert row["tokens_per_expert_mean"] == row["expected_tokens_per_expert"] == 10.0
    assert (row["tokens_per_expert_min"], row["tokens_per_expert_max"]) == (6.0, 16.0)


@pytest.mark.distributed
@pytest.mark.parametrize(("router", "k"), [("noisy_topk", 2), ("switch", 1)])
def test_cli_reports_tokens_per_expert_as_in_section_3_1(tmp_path, router, k):
    json_path, md_path = tmp_path / "p.json", tmp_path / "p.md"
    tokens, experts = 48, 4
    command = [
        sys.executable, "-m", "eval.bench_parallel", "--ranks", "1", "2", "--router", router,
        "--tokens-per-rank", str(tokens), "--experts", str(experts), "--k", str(k),
        "--d-model", "8", "--hidden", "8", "--warmup", "0", "--repeats", "2",
        "--timeout", "30", "--json", str(json_path), "--markdown", str(md_path),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(json_path.read_text())
    assert report["device"] and report["world_sizes"] == [1, 2] and report["router"] == router
    one, two = report["rows"]
    for row in (one, two):
        for key in ROW_KEYS:
            assert key in row, key
        assert row["ms"] > 0 and row["tokens_per_s"] > 0
        # Dropless: every (token, choice) pair is computed once ...
        assert row["expert_rows_per_step"] == k * row["global_tokens"]
        # ... so the mean over experts is k·b·d/n exactly.
        expected = k * tokens * row["ranks"] / experts
        assert row["expected_tokens_per_expert"] == expected
        assert row["tokens_per_expert_mean"] == expected
        assert row["tokens_per_expert_min"] <= expected <= row["tokens_per_expert_max"]
    assert (one["ranks"], two["ranks"]) == (1, 2)
    assert two["global_tokens"] == 2 * one["global_tokens"]
    # One rank makes no collective call; two ranks send rows both ways, forward and backward.
    assert one["bytes_sent_per_rank"] == 0 and one["all_to_all_ms"] == 0
    assert two["bytes_sent_per_rank"] > 0 and two["all_to_all_calls_per_step"] == 4
    assert "oversubscribe" in done.stdout
    assert "| ranks |" in md_path.read_text()
    assert f"wrote {json_path}" in done.stdout


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--experts", "6", "--ranks", "1", "4"], "must be a multiple of every --ranks"),
        (["--hidden", "0"], "--d-model, --hidden and --threads must be >= 1"),
        (["--timeout", "0"], "--timeout > 0"),
        (["--capacity-factor", "0"], "--capacity-factor must be > 0"),
        (["--json", "a-file/report.json"], "a-file is not a folder"),
    ],
)
def test_bad_options_exit_2_before_any_rank_starts(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit) as error:
        main(argv)
    assert error.value.code == 2
    err = capsys.readouterr().err
    assert "bench_parallel: error: " in err and message in err


# ----------------------------------------------------------------------------- whole models


def _model_rank(k: int, out: int, received: int, kept: int, routed: int, bytes_sent=None):
    """One rank's figures for one step of a model with one MoE layer of width 8 (32 bytes a
    row), as the worker reports them."""
    expected = 2 * 32 * (out + received)
    step = {
        "bytes_sent": expected if bytes_sent is None else bytes_sent, "calls": 4,
        "expected_bytes": expected, "out_rows": out, "kept_rows": [kept],
        "routed_rows": [routed], "row_bytes": 32,
    }  # fmt: skip
    return {
        "model": f"top{k}", "router": "r", "k": k, "capacity_factor": None, "n_experts": 4,
        "d_model": 8, "moe_layers": 1, "steps": [step],
    }  # fmt: skip


def test_whole_model_rows_follow_from_the_dispatch_counts():
    # 2 ranks of 16 tokens. Top-1 keeps 30 of its 32 pairs, 15 of them on the other rank;
    # top-4 keeps all 128, 64 on the other rank.
    top1 = summarise_model(2, 16, [_model_rank(1, 10, 5, 30, 32), _model_rank(1, 5, 10, 30, 32)])
    top4 = summarise_model(
        2, 16, [_model_rank(4, 40, 24, 128, 128), _model_rank(4, 24, 40, 128, 128)]
    )
    # A rank sends 2·(out + in) rows of 32 bytes: 2·32·15 and 2·32·64.
    assert (top1["bytes_sent_per_rank"], top4["bytes_sent_per_rank"]) == (960, 4096)
    assert (top1["bytes_per_token"], top4["bytes_per_token"]) == (60, 256)
    assert top1["rows_per_token"] == 30 / 32 and top1["fraction_dropped"] == 2 / 32
    assert top4["rows_per_token"] == 4 and top4["fraction_dropped"] == 0
    assert top1["off_rank_share"] == top4["off_rank_share"] == 0.5
    for row in (top1, top4):  # 16·D·ρ·φ·L bytes per token
        assert row["bytes_per_token"] == 16 * 8 * row["rows_per_token"] * row["off_rank_share"]
        assert row["matches_routing"]
    (ratio,) = ratios([top1, top4])
    assert ratio["bytes_per_token_ratio"] == 60 / 256 == (30 / 32) / 4
    assert ratio["rows_per_token_ratio"] == (30 / 32) / 4 and ratio["off_rank_share_ratio"] == 1
    wrong = summarise_model(2, 16, [_model_rank(1, 10, 5, 30, 32, bytes_sent=961)] * 2)
    assert not wrong["matches_routing"]


def _run_model_bench(tmp_path, *options: str) -> dict:
    json_path, md_path = tmp_path / "m.json", tmp_path / "m.md"
    command = [
        sys.executable, "-m", "eval.bench_parallel_model", "--d-model", "16", "--vocab", "64",
        "--batch-size", "4", "--bptt", "16", "--steps", "2", "--timeout", "60",
        "--json", str(json_path), "--markdown", str(md_path), *options,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert f"wrote {json_path}" in done.stdout and "| model |" in md_path.read_text()
    return json.loads(json_path.read_text())


@pytest.mark.distributed
def test_whole_models_send_exactly_the_rows_their_routing_kept(tmp_path):
    report = _run_model_bench(tmp_path, "--ranks", "1", "2")
    rows = {(row["model"], row["ranks"]): row for row in report["rows"]}
    assert set(rows) == {(m, w) for m in ("switch-32", "moe-top4-32", "MoE-32") for w in (1, 2)}
    for (model, world), row in rows.items():
        assert row["matches_routing"], model  # every rank, every step: 8·D·(out + in) bytes
        assert row["row_bytes"] == 4 * 16  # float32 rows of width D
        if world == 1:  # one process makes no collective call
            assert row["all_to_all_calls_per_step"] == row["bytes_sent_per_rank"] == 0
            continue
        # Two all-to-alls forward and two backward in each MoE layer.
        assert row["all_to_all_calls_per_step"] == 4 * row["moe_layers"]
        assert row["moe_layers"] == (1 if model == "MoE-32" else 2)
        # Averaged over ranks: 16·D·ρ·φ·L bytes per token.
        expected = 16 * 16 * row["rows_per_token"] * row["off_rank_share"] * row["moe_layers"]
        assert row["bytes_per_token"] == pytest.approx(expected, rel=1e-12)
        assert 0 < row["off_rank_share"] < 1
        if row["k"] == 4:  # dropless: every (token, choice) pair is sent
            assert row["rows_per_token"] == 4 and row["fraction_dropped"] == 0
        else:  # top-1 under a capacity: dropped pairs are never sent
            assert row["capacity_factor"] == 1.25
            assert row["rows_per_token"] == pytest.approx(1 - row["fraction_dropped"])
            assert row["rows_per_token"] <= 1
    (ratio,) = report["ratios"]
    assert (ratio["top1"], ratio["other"], ratio["ranks"]) == ("switch-32", "moe-top4-32", 2)
    dropped = rows["switch-32", 2]["fraction_dropped"]
    assert ratio["rows_per_token_ratio"] == pytest.approx((1 - dropped) / 4)
    assert ratio["bytes_per_token_ratio"] == pytest.approx(
        ratio["rows_per_token_ratio"] * ratio["off_rank_share_ratio"]
    )


@pytest.mark.distributed
def test_dropless_top1_keeps_exactly_a_quarter_of_top4s_rows(tmp_path):
    report = _run_model_bench(
        tmp_path, "--ranks", "2", "--dropless", "--models", "switch-32", "moe-top4-32"
    )
    (ratio,) = report["ratios"]
    assert ratio["rows_per_token_ratio"] == 0.25
    # What is sent differs from a quarter only by the two off-rank shares.
    assert ratio["bytes_per_token_ratio"] == pytest.approx(0.25 * ratio["off_rank_share_ratio"])
    assert all(row["capacity_factor"] is None for row in report["rows"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--models", "MoE-4096"], "--models: unknown"),
        (["--ranks", "3"], "not a multiple of 3 ranks"),
        (["--d-model", "18"], "multiple of switch-32's 4 heads"),
        (["--steps", "0"], "must be >= 1"),
    ],
)
def test_whole_model_bad_options_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as error:
        model_main(argv)
    assert error.value.code == 2
    assert message in capsys.readouterr().err
