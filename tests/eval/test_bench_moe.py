"""The benchmark's peer designs compute the layer they stand for, and its CLI writes the
documented report. (Speed itself is measured by `make bench`, never asserted here.)"""

import json
import subprocess
import sys

import pytest
import torch

from eval.bench_moe import ALL_CONTENDERS, build_contender, main, transformers_available
from eval.moe_peers import DenseFFN, OneHotSwitchMoE, SparseDispatcherMoE, SwitchLoopMoE
from lstm_moe.moe import MoELayer

D, H, E, T = 16, 8, 6, 40


def _copy_experts(layer: MoELayer, peer) -> None:
    with torch.no_grad():
        for e, module in enumerate(peer.experts):
            module[0].weight.copy_(layer.experts.w_in[e].t())
            module[2].weight.copy_(layer.experts.w_out[e].t())


@pytest.mark.parametrize("training", [False, True])
def test_the_sparse_dispatcher_design_is_the_noisy_top_k_layer(training):
    """Same weights and the same noise draw: the same output and auxiliary loss as MoELayer."""
    torch.manual_seed(0)
    layer = MoELayer(D, E, H, 2).train(training)
    peer = SparseDispatcherMoE(D, E, H, 2).train(training)
    with torch.no_grad():
        layer.router.w_gate.normal_(0, 0.5)
        layer.router.w_noise.normal_(0, 0.5)
        peer.w_gate.copy_(layer.router.w_gate)
        peer.w_noise.copy_(layer.router.w_noise)
    _copy_experts(layer, peer)
    x = torch.randn(T, D)
    torch.manual_seed(1)
    want = layer(x)
    torch.manual_seed(1)
    got, aux = peer(x)
    torch.testing.assert_close(got, want.output)
    torch.testing.assert_close(aux, want.aux_loss)


def test_the_switch_loop_design_is_the_switch_layer_where_nothing_is_dropped():
    torch.manual_seed(0)
    layer = MoELayer(D, E, H, 1, "switch", capacity_factor=float(E)).eval()
    peer = SwitchLoopMoE(D, E, H, capacity_factor=float(E)).eval()
    with torch.no_grad():
        peer.router.weight.copy_(layer.router.w_router.t())
    _copy_experts(layer, peer)
    x = torch.randn(T, D)
    want = layer(x)
    got, aux = peer(x)
    torch.testing.assert_close(got, want.output)
    torch.testing.assert_close(aux, want.aux_loss)


def test_the_switch_loop_design_passes_dropped_tokens_through_scaled_by_their_probability():
    torch.manual_seed(0)
    peer = SwitchLoopMoE(D, 2, H, capacity_factor=0.25).eval()  # 5 of 40 tokens per expert
    x = torch.randn(T, D)
    out, _ = peer(x)
    probs = torch.softmax(peer.router(x), -1)
    chosen = probs.argmax(-1)
    for expert in range(2):
        tokens = (chosen == expert).nonzero().flatten()
        dropped = tokens[5:]
        torch.testing.assert_close(
            out[dropped], probs[dropped].max(-1).values[:, None] * x[dropped]
        )


@pytest.mark.parametrize("capacity_factor", [float(E), 0.5])
def test_the_one_hot_design_is_the_switch_layer_drops_included(capacity_factor):
    """At capacity 0.5 (4 slots per expert for 40 tokens) most experts drop tokens: the
    one-hot slots must drop the same ones, in token order, as the layer's dispatcher."""
    torch.manual_seed(0)
    layer = MoELayer(D, E, H, 1, "switch", capacity_factor=capacity_factor).eval()
    peer = OneHotSwitchMoE(D, E, H, capacity_factor=capacity_factor).eval()
    with torch.no_grad():
        peer.w_router.copy_(layer.router.w_router)
        peer.w_in.copy_(layer.experts.w_in)
        peer.w_out.copy_(layer.experts.w_out)
    x = torch.randn(T, D)
    want = layer(x)
    got, aux = peer(x)
    if capacity_factor < 1:
        assert want.stats.fraction_dropped > 0.2
    torch.testing.assert_close(got, want.output)
    torch.testing.assert_close(aux, want.aux_loss)


@pytest.mark.parametrize("k", [4, 1])
def test_every_contender_runs_forward_and_backward_in_bf16(k):
    """bf16 is the benchmark's dtype on CUDA: each contender cast to it still runs (its
    router in float32 where the design says so)."""
    names = [c for c in ALL_CONTENDERS if c != "transformers" or transformers_available()]
    for name in names:
        if (k == 4 and name in ("switch_loop", "one_hot", "transformers")) or (
            k == 1 and name == "sparse_dispatcher"
        ):
            continue
        torch.manual_seed(0)
        model = build_contender(name, k, 4, D, H).to(torch.bfloat16).train()
        x = torch.randn(T, D, dtype=torch.bfloat16, requires_grad=True)
        result = model(x)
        out, aux = result if isinstance(result, tuple) else (result.output, result.aux_loss)
        (out.float().sum() + aux).backward()
        assert torch.isfinite(out).all() and torch.isfinite(x.grad).all(), name


def test_the_dense_contender_has_the_width_of_k_experts():
    dense = DenseFFN(D, 4 * H)
    assert dense.inner.weight.shape == (4 * H, D) and dense.outer.weight.shape == (D, 4 * H)


def test_cli_writes_both_tables_as_json_and_markdown(tmp_path):
    json_path, md_path = tmp_path / "b.json", tmp_path / "b.md"
    command = [
        sys.executable, "-m", "eval.bench_moe", "--tokens", "64", "--d-model", "16",
        "--experts", "4", "--hidden", "16", "--repeats", "1", "--warmup", "0",
        "--json", str(json_path), "--markdown", str(md_path),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(json_path.read_text())
    assert report["device"] and report["hugepages"] is False
    assert [table["k"] for table in report["tables"]] == [4, 1]
    for table in report["tables"]:
        assert [row["n_experts"] for row in table["rows"]] == [4]
        assert {"moe", "dense"} <= set(table["contenders"])
        for row in table["rows"]:
            for contender in table["contenders"]:
                assert row["ms"][contender] > 0 and row["peak_mb"][contender] is not None
            assert row["router_ms"] > 0
    text = md_path.read_text()
    assert "sparse_dispatcher/moe" in text and "switch_loop/moe" in text and "| E | H |" in text
    assert "one_hot/moe" in text
    assert f"wrote {json_path}" in done.stdout


def test_past_max_seconds_no_new_size_starts_and_the_sizes_left_out_are_listed(tmp_path):
    """The first size starts at once; by the time it is done the limit has passed."""
    json_path, md_path = tmp_path / "b.json", tmp_path / "b.md"
    argv = ["--tokens", "32", "--d-model", "16", "--hidden", "16", "--experts", "4", "8",
            "--k", "1", "--contenders", "moe", "dense", "--repeats", "1", "--warmup", "0",
            "--max-seconds", "0.001", "--json", str(json_path),
            "--markdown", str(md_path)]  # fmt: skip
    assert main(argv) == 0
    (table,) = json.loads(json_path.read_text())["tables"]
    assert [row["n_experts"] for row in table["rows"]] == [4]
    assert table["skipped_experts"] == [8]
    assert "Not run: E = 8 (past --max-seconds)." in md_path.read_text()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tokens", "0"], "must be >= 1"),
        (["--hidden", "0"], "must be >= 1"),
        (["--warmup", "-1"], "--warmup must be >= 0"),
        (["--max-seconds", "0"], "--max-seconds must be > 0"),
        (["--experts", "2", "--k", "4"], "must be >= --k"),
        (["--contenders", "dense"], "must include moe"),
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
