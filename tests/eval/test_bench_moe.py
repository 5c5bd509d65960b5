"""The benchmark's contenders compute the same function, and its CLI writes the documented
report. (Speed itself is measured by `make bench`, never asserted here.)"""

import json
import subprocess
import sys

import pytest
import torch

from eval.bench_moe import LoopMoE, OneHotMoE, ProjectMoE, main


def test_contenders_compute_the_same_moe():
    torch.manual_seed(0)
    n_experts, d_model, hidden, k, tokens = 5, 16, 8, 2, 40
    moe = ProjectMoE(n_experts, d_model, hidden, k, bias=True)
    loop = LoopMoE(n_experts, d_model, hidden, bias=True)
    onehot = OneHotMoE(n_experts, d_model, hidden, float(n_experts), bias=True)  # no drops
    experts = moe.layer.experts
    with torch.no_grad():
        for e, module in enumerate(loop.experts):
            module[0].weight.copy_(experts.w_in[e].t())
            module[0].bias.copy_(experts.b_in[e])
            module[2].weight.copy_(experts.w_out[e].t())
            module[2].bias.copy_(experts.b_out[e])
        onehot.load_state_dict(
            {
                "w_in": experts.w_in,
                "b_in": experts.b_in,
                "w_out": experts.w_out,
                "b_out": experts.b_out,
            }
        )
    x = torch.randn(tokens, d_model)
    expert_index = torch.stack([torch.randperm(n_experts)[:k] for _ in range(tokens)])
    gates = torch.softmax(torch.randn(tokens, k), -1)
    want = moe(x, expert_index, gates)
    torch.testing.assert_close(loop(x, expert_index, gates), want)
    torch.testing.assert_close(onehot(x, expert_index, gates), want)


def test_onehot_drops_over_capacity_like_the_dispatcher():
    """With capacity 1 per expert and slot-major priority, only first choices that are the
    first for their expert survive."""
    onehot = OneHotMoE(2, 4, 4, capacity_factor=0.5)  # C = ceil(0.5 · 4 · 1 / 2) = 1
    x = torch.randn(4, 4)
    expert_index = torch.tensor([[0], [0], [1], [1]])
    gates = torch.ones(4, 1)
    out = onehot(x, expert_index, gates)
    assert out[1].abs().sum() == 0 and out[3].abs().sum() == 0
    assert out[0].abs().sum() > 0 and out[2].abs().sum() > 0


def test_cli_writes_json_and_markdown(tmp_path):
    json_path, md_path = tmp_path / "b.json", tmp_path / "b.md"
    command = [
        sys.executable, "-m", "eval.bench_moe", "--tokens", "64", "--d-model", "16",
        "--experts", "2", "4", "--hidden", "16", "--k", "2", "--repeats", "1", "--warmup", "0",
        "--json", str(json_path), "--markdown", str(md_path),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(json_path.read_text())
    assert report["device"]
    assert [row["n_experts"] for row in report["rows"]] == [2, 4]
    for row in report["rows"]:
        for key in ("n_experts", "expert_hidden", "tokens", "k", "moe_ms", "dense_ms", "loop_ms",
                    "onehot_ms", "peak_mb"):  # fmt: skip
            assert key in row, key
        for key in ("moe_ms", "dense_ms", "loop_ms", "onehot_ms"):
            assert row[key] > 0
    assert "| E | H |" in md_path.read_text()
    assert f"wrote {json_path}" in done.stdout


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tokens", "0"], "must be >= 1"),
        (["--experts", "4", "8", "--hidden", "16", "0"], "must be >= 1"),
        (["--warmup", "-1"], "--warmup must be >= 0"),
        (["--experts", "2", "--hidden", "8", "--k", "4"], "must be >= --k"),
        (["--device", "gpu"], "'gpu' is not a device"),
        (["--json", "."], "is a folder"),
        (["--markdown", "a-file/table.md"], "a-file is not a folder"),
    ],
)
def test_bad_options_exit_2_before_anything_runs(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit) as error:
        main(argv)
    assert error.value.code == 2
    err = capsys.readouterr().err
    assert "bench_moe: error: " in err and message in err
