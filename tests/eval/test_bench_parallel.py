"""The expert-parallel benchmark's CLI writes the documented report, and its routing figures
follow §3.1: dropless, each expert computes k·b·d/n rows on average per step. (Speed itself is
measured by `python -m eval.bench_parallel`, never asserted here.)"""

import argparse
import json
import subprocess
import sys

import pytest

from eval.bench_parallel import main, summarise

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
