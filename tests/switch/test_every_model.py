"""Every router in every model family, from the command line: the LSTM and Transformer
language models and translation models each build from their config, train, save, resume and
evaluate; and a Switch Transformer (GEGLU experts, a capacity) on 2 gloo ranks trains like
one process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.multiprocessing as mp

from eval.perplexity import main as perplexity_main
from eval.translate import main as translate_main
from lstm_moe.files import read_json
from lstm_moe.moe import ROUTERS
from lstm_moe.tasks import lm, translation
from lstm_moe.train import main as train_main
from tests.ranks import free_port, no_noise, run_commands
from tests.runs import assert_same_metrics, read_metrics

ROUTER_OPTIONS = {
    "noisy_topk": ["--k=2"],
    "hierarchical": ["--n_groups=2", "--k_groups=2", "--k=1"],
    "batchwise": ["--k=2"],
    "switch": ["--k=1", "--capacity_factor=1.25", "--eval_capacity_factor=2"],
    # Every family has a causal stack with an MoE layer, so the flag is needed everywhere.
    "expert_choice": ["--k=1", "--capacity_factor=1.5", "--allow_noncausal_routing=true"],
}
COMMON = ["--n_experts=4", "--expert_hidden=16", "--dropout=0.0", "--lr=0.01",
          "--warmup_steps=2", "--log_every=1", "--eval_every=2", "--checkpoint_every=2",
          "--quiet"]  # fmt: skip
MODELS = {
    "lstm-lm": ["--preset", "MoE-32", "--d_model=16", "--lstm_hidden=16", "--softmax=full",
                "--batch_size=8", "--bptt=10", "--eval_tokens=200"],
    "transformer-lm": ["--preset", "switch-8", "--d_model=16", "--n_heads=2",
                       "--ffn_hidden=16", "--softmax=full", "--batch_size=8", "--bptt=10",
                       "--eval_tokens=200"],
    "lstm-nmt": ["--preset", "NMT-MoE-32", "--d_model=16", "--lstm_hidden=16",
                 "--attention_hidden=16", "--batch_size=8", "--eval_pairs=20"],
    "transformer-nmt": ["--preset", "NMT-switch-8", "--d_model=16", "--n_heads=2",
                        "--ffn_hidden=16", "--batch_size=8", "--eval_pairs=20"],
}  # fmt: skip


def assert_moe_of(model, router: str) -> None:
    layers = [m for m in model.modules() if type(m).__name__ == "MoELayer"]
    assert layers and all(type(layer.router) is ROUTERS[router] for layer in layers)


@pytest.mark.parametrize("router", list(ROUTER_OPTIONS))
@pytest.mark.parametrize("family", list(MODELS))
def test_every_router_in_every_model_trains_resumes_and_evaluates(
    family, router, tiny_dataset, parallel_dataset, tmp_path
):
    data = parallel_dataset if family.endswith("nmt") else tiny_dataset
    run = tmp_path / "run"
    argv = ["--data", str(data), "--run", str(run), *MODELS[family], *COMMON,
            f"--router={router}", *ROUTER_OPTIONS[router], "--max_steps=2"]  # fmt: skip
    assert train_main(argv) == 0
    assert train_main(["--run", str(run), "--resume", "--max_steps=4", "--quiet"]) == 0
    assert [e["step"] for e in read_metrics(run)] == [1, 2, 3, 4]
    assert [e["step"] for e in read_metrics(run, "valid")] == [2, 4]
    config = read_json(run / "config.json")
    assert config["arch"] == family.split("-")[0]
    assert config["model"]["moe"]["router"] == router
    assert perplexity_main([str(run)]) == 0
    assert read_json(run / "eval" / "perplexity.json")["tokens"] > 0
    if family.endswith("nmt"):
        model = translation.load_trained_model(run, "cpu")[0]
        assert translate_main([str(run), "--quiet", "--limit=4", "--beam=2"]) == 0
        assert (run / "eval" / "bleu.json").is_file()
    else:
        model = lm.load_trained_model(run, "cpu")[0]
    assert_moe_of(model, router)


def test_the_arch_and_the_preset_must_agree(tiny_dataset, tmp_path, capsys):
    argv = ["--data", str(tiny_dataset), "--run", str(tmp_path / "r"), "--arch", "lstm",
            "--preset", "switch-8", "--max_steps=1", "--quiet"]  # fmt: skip
    assert train_main(argv) == 2
    assert "is a --arch transformer model" in capsys.readouterr().err


def test_arch_alone_picks_the_default_config(tiny_dataset, tmp_path):
    run = tmp_path / "r"
    argv = ["--data", str(tiny_dataset), "--run", str(run), "--arch", "transformer",
            "--d_model=16", "--n_layers=2", "--n_heads=2", "--ffn_hidden=16",
            "--moe_layers=1", "--n_experts=4", "--expert_hidden=16", "--batch_size=8",
            "--bptt=10", "--max_steps=1", "--eval_tokens=100", "--quiet"]  # fmt: skip
    assert train_main(argv) == 0
    config = read_json(run / "config.json")
    assert config["arch"] == "transformer" and config["preset"] is None
    assert config["model"]["moe"]["router"] == "switch"  # Switch-Base's layer


# ----------------------------------------------------------------------------- 2 ranks

TWO_RANKS = {
    # GEGLU experts (their gate an expert tensor, sharded and reduced as one), a capacity
    # that drops tokens, no jitter (the switch router's one random draw).
    "lm": ["--data", None, *MODELS["transformer-lm"], *COMMON, "--activation=geglu",
           "--capacity_factor=0.75", "--jitter_eps=0"],
    "nmt": ["--data", None, *MODELS["transformer-nmt"], *COMMON, "--capacity_factor=0.75",
            "--jitter_eps=0"],
}  # fmt: skip


def _argv(task: str, data: Path, run: Path) -> list[str]:
    argv = [str(data) if a is None else a for a in TWO_RANKS[task]]
    return [*argv, "--run", str(run), "--max_steps=6", "--eval_every=3", "--checkpoint_every=3"]


@pytest.mark.distributed
def test_a_switch_transformer_on_two_ranks_trains_like_one_process(
    tiny_dataset, parallel_dataset, tmp_path
):
    data = {"lm": tiny_dataset, "nmt": parallel_dataset}
    one = {task: tmp_path / f"{task}-one" for task in TWO_RANKS}
    two = {task: tmp_path / f"{task}-two" for task in TWO_RANKS}
    with no_noise():
        for task in TWO_RANKS:
            assert train_main(_argv(task, data[task], one[task])) == 0
    commands = [("lstm_moe.train", _argv(task, data[task], two[task])) for task in TWO_RANKS]
    mp.spawn(run_commands, args=(2, free_port(), commands), nprocs=2, join=True)
    for task in TWO_RANKS:
        assert_same_metrics(two[task], one[task], range(1, 7), train_keys=None, valid_keys=None)
        assert sorted(p.name for p in two[task].glob("experts-*")) == [
            "experts-step6-rank0-of2.pt",
            "experts-step6-rank1-of2.pt",
        ]
        last = read_metrics(one[task])[-1]
        dropped = [v for k, v in last.items() if k.endswith("fraction_dropped")]
        assert dropped and max(dropped) > 0  # the capacity bites
