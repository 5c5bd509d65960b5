"""The grouped-product benchmark splits rows as it says and writes its report (its numbers
are measured by running it on a GPU, never asserted here)."""

import json

import pytest

from eval.bench_grouped_mm import balanced_counts, main


def test_rows_are_split_as_evenly_as_they_allow():
    assert balanced_counts(10, 4) == [3, 3, 2, 2]
    assert balanced_counts(8, 8) == [1] * 8


def test_cli_writes_one_row_per_shape_and_expert_count(tmp_path, capsys):
    json_path, md_path = tmp_path / "g.json", tmp_path / "g.md"
    argv = ["--device", "cpu", "--shape", "64,16,32", "--shape", "48,16,16", "--experts", "1",
            "4", "--warmup", "0", "--repeats", "1", "--json", str(json_path),
            "--markdown", str(md_path)]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads(json_path.read_text())["rows"]
    assert [(r["n_rows"], r["n_experts"]) for r in rows] == [(64, 1), (64, 4), (48, 1), (48, 4)]
    for row in rows:
        assert row["grouped_forward_ms"] > 0 and row["dense_forward_backward_ms"] > 0
        assert row["forward_ratio"] == pytest.approx(
            row["dense_forward_ms"] / row["grouped_forward_ms"]
        )
    assert "| 64 | 16 | 32 | 4 | 16 |" in md_path.read_text()
    assert f"wrote {json_path}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--shape", "64,16"], "a shape is N,D,H"),
        (["--shape", "4,16,16", "--experts", "8"], "every expert needs a row"),
        (["--device", "cpu", "--repeats", "0"], "must be >= 1"),
    ],
)
def test_bad_options_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as error:
        main(["--device", "cpu", *argv])
    assert error.value.code == 2 and message in capsys.readouterr().err
