"""Training end to end on a generated dataset: the loss falls, a resumed run equals an
uninterrupted one, and mismatches on --resume are refused."""

import json
import shutil

import pytest

from eval.perplexity import main as perplexity_main
from lstm_moe.train import main as train_main
from tests.lm.conftest import make_dataset
from tests.runs import read_metrics

SMALL = [
    "--preset=MoE-32",
    "--d_model=16",
    "--lstm_hidden=16",
    "--n_experts=4",
    "--k=2",
    "--expert_hidden=16",
    "--softmax=full",
    "--batch_size=8",
    "--bptt=10",
    "--warmup_steps=10",
    "--lr=0.01",
    "--eval_every=20",
    "--checkpoint_every=10",
    "--log_every=5",
    "--quiet",
]


def train(data, run, *extra):
    preset = [a.replace("--preset=", "") for a in SMALL if a.startswith("--preset=")]
    args = [a for a in SMALL if not a.startswith("--preset=")]
    return train_main(
        ["--data", str(data), "--run", str(run), "--preset", preset[0], *args, *extra]
    )


def test_training_lowers_the_loss_and_evaluates(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    assert train(tiny_dataset, run, "--max_steps=60") == 0
    losses = [e["loss"] for e in read_metrics(run)]
    assert losses[-1] < losses[0] - 0.5
    entry = read_metrics(run)[-1]
    for key in ("importance", "load", "cv_load", "max_over_mean_load", "tokens_per_s", "ppl"):
        assert key in entry
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["moe"]["n_experts"] == 4 and config["train"]["max_steps"] == 60
    assert perplexity_main([str(run)]) == 0
    result = json.loads((run / "eval" / "perplexity.json").read_text())
    meta = json.loads((tiny_dataset / "meta.json").read_text())
    assert result["tokens"] == meta["splits"]["test"]["tokens"]  # every word and </S> once
    assert result["perplexity"] < 40  # vocabulary of 43: far below uniform after training
    assert len(result["moe_layers"]) == 1


def test_resume_equals_an_uninterrupted_run(tiny_dataset, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert train(tiny_dataset, whole, "--max_steps=40") == 0
    assert train(tiny_dataset, split, "--max_steps=20") == 0
    assert train_main(["--run", str(split), "--resume", "--max_steps=40", "--quiet"]) == 0
    want = [(e["step"], e["loss"], e["aux_loss"]) for e in read_metrics(whole)]
    got = [(e["step"], e["loss"], e["aux_loss"]) for e in read_metrics(split)]
    assert got == want


def test_resume_after_a_kill_loses_at_most_one_interval(tiny_dataset, tmp_path):
    """A run killed between checkpoints restarts from the last one: simulate by restoring an
    older checkpoint and a metrics log that ran further, then resuming."""
    run = tmp_path / "run"
    assert train(tiny_dataset, run, "--max_steps=20") == 0
    checkpoint_at_20 = (run / "checkpoint.pt").read_bytes()
    assert train_main(["--run", str(run), "--resume", "--max_steps=25", "--quiet"]) == 0
    (run / "checkpoint.pt").write_bytes(checkpoint_at_20)  # the kill came before step 30
    (run / "checkpoint.pt.tmp").write_bytes(b"half-written")  # and during a checkpoint write
    assert train_main(["--run", str(run), "--resume", "--max_steps=40", "--quiet"]) == 0
    steps = [e["step"] for e in read_metrics(run)]
    assert steps == sorted(set(steps)) and steps[-1] == 40


def test_resume_refuses_another_vocabulary(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    assert train(tiny_dataset, run, "--max_steps=10") == 0
    other = make_dataset(tmp_path / "other", n_words=40, seed=1)
    shutil.copy(tiny_dataset / "vocab.txt", other / "vocab.txt")  # same size, same words
    other_meta = json.loads((other / "meta.json").read_text())
    other_meta["vocab"]["sha256"] = "0" * 64  # a different vocabulary file
    (other / "meta.json").write_text(json.dumps(other_meta))
    assert train_main(["--run", str(run), "--resume", "--data", str(other), "--quiet"]) == 2


def test_new_run_refuses_to_overwrite_and_resume_refuses_model_changes(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    assert train(tiny_dataset, run, "--max_steps=10") == 0
    assert train(tiny_dataset, run, "--max_steps=10") == 2
    assert train_main(["--run", str(run), "--resume", "--n_experts=8", "--quiet"]) == 2


@pytest.mark.parametrize("bad", ["--n_experts=zero", "--no_such_field=1", "--k=9"])
def test_bad_overrides_are_clear_errors(tiny_dataset, tmp_path, bad, capsys):
    assert train(tiny_dataset, tmp_path / "run", "--max_steps=1", bad) == 2
    assert "error:" in capsys.readouterr().err


def test_resume_with_the_sampled_softmax_is_exact(tiny_dataset, tmp_path):
    """The sampled softmax draws candidates from the RNG, so this checks that its state is
    carried across the interruption too (vocabulary 43 > 8 samples: sampling is on)."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    sampled = ["--softmax=sampled", "--n_samples=8"]
    assert train(tiny_dataset, whole, "--max_steps=30", *sampled) == 0
    assert train(tiny_dataset, split, "--max_steps=10", *sampled) == 0
    assert train_main(["--run", str(split), "--resume", "--max_steps=30", "--quiet"]) == 0
    want = [(e["step"], e["loss"]) for e in read_metrics(whole)]
    assert [(e["step"], e["loss"]) for e in read_metrics(split)] == want
    assert "sampled_ppl" in read_metrics(whole)[-1]


def test_resume_refuses_changes_that_move_the_data_or_the_schedule(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    assert train(tiny_dataset, run, "--max_steps=10") == 0
    for change in ("--bptt=7", "--lr=0.5", "--batch_size=3"):
        assert train_main(["--run", str(run), "--resume", change, "--quiet"]) == 2
    assert train_main(["--run", str(run), "--resume", "--max_steps=15", "--quiet"]) == 0


def test_equals_form_of_named_arguments(tiny_dataset, tmp_path):
    args = [a for a in SMALL if not a.startswith("--preset=")]
    run = tmp_path / "run"
    assert (
        train_main(
            [f"--data={tiny_dataset}", f"--run={run}", "--preset=MoE-32", *args, "--max_steps=5"]
        )
        == 0
    )
    assert train(tiny_dataset, tmp_path / "bad", "--max_steps=5", "--checkpoint_every=7") == 2
