"""The Transformer LM speed benchmark runs, times every preset it names and reports each one
over the dense preset."""

from eval.bench_transformer import main
from lstm_moe.files import read_json


def test_the_benchmark_reports_every_preset_over_the_dense_one(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--presets", "transformer-dense", "switch-8", "--width=16", "--batch_size=2",
            "--bptt=4", "--vocab=50", "--steps=1", "--rounds=1", "--json", str(out),
            "--markdown", str(tmp_path / "bench.md")]  # fmt: skip
    assert main(argv) == 0
    rows = {r["preset"]: r for r in read_json(out)["rows"]}
    assert list(rows) == ["transformer-dense", "switch-8"]
    assert rows["transformer-dense"]["over_dense"] == 1.0
    assert rows["switch-8"]["tokens_per_s"] > 0
    assert rows["switch-8"]["total_params"] > rows["transformer-dense"]["total_params"]
    assert "| switch-8 |" in (tmp_path / "bench.md").read_text()


def test_the_benchmark_needs_the_dense_preset(capsys):
    assert main(["--presets", "switch-8"]) == 2
    assert "must include transformer-dense" in capsys.readouterr().err
