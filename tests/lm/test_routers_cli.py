"""Every router by name from the command line: it trains, saves, resumes and evaluates, and
config.json and the rebuilt model describe the router that was trained, with its options."""

import json

import pytest

from eval.perplexity import main as perplexity_main
from lstm_moe.moe import ROUTERS
from lstm_moe.tasks.lm import load_trained_model
from lstm_moe.train import main as train_main
from tests.lm.test_train import train
from tests.runs import read_metrics

CASES = {
    "noisy_topk": ["--noise_epsilon=0.02"],
    "hierarchical": ["--n_groups=2", "--k_groups=2", "--k=1"],
    "batchwise": ["--w_threshold=0.5"],
    "switch": ["--k=1", "--capacity_factor=1.25", "--w_z=0.001", "--jitter_eps=0.05",
               "--w_balance=0.02"],
}  # fmt: skip
# The losses each router reports, unweighted, in the training log.
LOSSES = {
    "noisy_topk": ("importance", "load"),
    "hierarchical": ("importance", "load"),
    "batchwise": ("importance", "load", "threshold"),
    "switch": ("balance", "z"),
}


@pytest.mark.parametrize("router", list(CASES))
def test_every_router_by_name_trains_resumes_and_evaluates(tiny_dataset, tmp_path, router):
    run = tmp_path / router
    assert train(tiny_dataset, run, "--max_steps=10", f"--router={router}", *CASES[router]) == 0
    assert train_main(["--run", str(run), "--resume", "--max_steps=15", "--quiet"]) == 0
    assert [e["step"] for e in read_metrics(run)] == [5, 10, 15]
    for name in LOSSES[router]:
        assert name in read_metrics(run)[-1], name

    moe = json.loads((run / "config.json").read_text())["model"]["moe"]
    assert moe["router"] == router
    for option in CASES[router]:
        name, value = option[2:].split("=")
        assert str(moe[name]) == value, name

    model = load_trained_model(run, "cpu")[0]
    layer = model.blocks[1].moe
    assert type(layer.router) is ROUTERS[router]
    for option in CASES[router]:  # the rebuilt router holds what the command line asked for
        name, value = option[2:].split("=")
        holder = layer.config if name == "capacity_factor" else layer.router
        assert str(getattr(holder, name)) == value, name
    assert perplexity_main([str(run)]) == 0
    result = json.loads((run / "eval" / "perplexity.json").read_text())
    assert result["perplexity"] < 43  # the vocabulary's size: better than uniform
    assert sum(result["moe_layers"][0]["tokens_per_expert"]) > 0


def test_the_switch_router_counts_one_gating_matrix(tiny_dataset, tmp_path):
    ops = {}
    for router in ("noisy_topk", "switch"):
        run = tmp_path / router
        assert train(tiny_dataset, run, "--max_steps=1", f"--router={router}", "--k=2") == 0
        ops[router] = json.loads((run / "config.json").read_text())["ops_per_timestep"]
    assert ops["noisy_topk"] - ops["switch"] == 16 * 4  # W_noise: d_model × n_experts
