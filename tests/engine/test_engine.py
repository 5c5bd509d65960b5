"""The engine trains a task it was not written for (tests/engine/copy_task.py): it learns,
resumes exactly, accumulates micro-batches into the update of one larger batch, normalises by
the real targets of all ranks when ranks hold different numbers of them, and treats every
tensor of a module that holds an expert shard as an expert tensor, at 1 and 2 gloo ranks.

Router noise is replaced by zeros (torch.randn_like patched, in the workers too): a rank draws
noise for its own tokens only, so with noise 2 ranks would differ from one process by the
draws. Agreement across ranks and micro-batches is to 1e-5 (relative): the same sums in
another order.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lstm_moe.engine import TrainConfig, Trainer
from lstm_moe.engine.checkpoint import (
    load_optimizer_state_by_name,
    load_run_checkpoint,
    optimizer_state_by_name,
)
from lstm_moe.engine.ranks import join_ranks
from tests.engine.copy_task import CopyModelConfig, CopyTask, CopyTaskConfig
from tests.ranks import free_port, no_noise

TOL = dict(rel=1e-5, abs=1e-6)
NO_BALANCE = dict(w_importance=0.0, w_load=0.0)  # per micro-batch: not accumulable exactly
MODELS = {
    "plain": CopyModelConfig(),
    "no_balance": CopyModelConfig(**NO_BALANCE),
    "glu": CopyModelConfig(glu=True),
    "capacity": CopyModelConfig(capacity_factor=0.75),  # drops tokens; balancing on
}


def trainer(run: Path, model: str, steps: int, micro: int = 1, group=None, **config) -> Trainer:
    task = CopyTask(MODELS[model], CopyTaskConfig(), run, group, micro_batches=micro)
    config = TrainConfig(**{
        "lr": 0.02, "warmup_steps": 5, "max_steps": steps, "micro_batches": micro,
        "log_every": 1, "checkpoint_every": 5, "eval_every": 5, **config,
    })  # fmt: skip
    return Trainer(run, task, config, group)


def train(run: Path, model: str, steps: int, micro: int = 1, resume: bool = False, group=None,
          **config):  # fmt: skip
    t = trainer(run, model, steps, micro, group, **config)
    t.restore() if resume else t.start_fresh()
    t.fit(progress=False)
    return t


def metrics(run: Path, kind: str = "train") -> dict[int, dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {e["step"]: e for e in map(json.loads, lines) if e["kind"] == kind}


def assert_same(got: Path, want: Path, keys=("loss", "grad_norm"), exact=False) -> None:
    for kind, names in (("train", keys), ("valid", ("valid_loss",))):
        g, w = metrics(got, kind), metrics(want, kind)
        assert sorted(g) == sorted(w) and w, kind
        for step in w:
            for key in names:
                expected = w[step][key] if exact else pytest.approx(w[step][key], **TOL)
                assert g[step][key] == expected, (kind, step, key)
    got_model = load_run_checkpoint(got)["model"]
    for name, value in load_run_checkpoint(want)["model"].items():
        assert got_model[name].shape == value.shape, name
        torch.testing.assert_close(got_model[name], value, rtol=1e-5, atol=1e-6)


def test_the_copy_task_learns_and_resumes_exactly(tmp_path):
    with no_noise():
        whole = train(tmp_path / "whole", "plain", 20)
        train(tmp_path / "split", "plain", 10)
        split = train(tmp_path / "split", "plain", 20, resume=True)
    losses = [e["loss"] for e in metrics(tmp_path / "whole").values()]
    assert losses[-1] < losses[0] - 0.5
    assert_same(tmp_path / "split", tmp_path / "whole", ("loss", "aux_loss", "load"), exact=True)
    assert split.task.state_dict() == whole.task.state_dict()  # the task's own state resumed
    assert split.tokens == whole.tokens == whole.task.targets_seen


def test_a_run_stopped_off_the_log_grid_resumes_to_the_uninterrupted_log(tmp_path):
    """Stopped at step 7 (log every 5, validate every 5): its partial log interval is saved
    and continued, and the entries written at step 7 give way to those of steps 10 and 20."""
    cadence = {"log_every": 5, "checkpoint_every": 10, "eval_every": 5}
    with no_noise():
        train(tmp_path / "whole", "plain", 20, **cadence)
        train(tmp_path / "split", "plain", 7, **cadence)
        assert 7 in metrics(tmp_path / "split") and 7 in metrics(tmp_path / "split", "valid")
        train(tmp_path / "split", "plain", 20, resume=True, **cadence)
    assert sorted(metrics(tmp_path / "split")) == [5, 10, 15, 20]
    assert_same(tmp_path / "split", tmp_path / "whole", ("loss", "aux_loss", "load"), exact=True)


def test_the_task_refuses_to_resume_on_other_data(tmp_path):
    with no_noise():
        train(tmp_path / "run", "plain", 5)
    t = trainer(tmp_path / "run", "plain", 10)
    t.task.data_version = 2
    with pytest.raises(ValueError, match="trained on other data"):
        t.restore()


@pytest.mark.parametrize("micro", [2, 4])
def test_micro_batches_make_the_update_of_one_larger_batch(tmp_path, micro):
    """Balancing losses off: they are per micro-batch (a CV² over a smaller batch)."""
    with no_noise():
        train(tmp_path / "one", "no_balance", 10)
        train(tmp_path / "micro", "no_balance", 10, micro=micro)
    assert_same(tmp_path / "micro", tmp_path / "one")
    assert [e["tokens"] for e in metrics(tmp_path / "micro").values()] == [
        e["tokens"] for e in metrics(tmp_path / "one").values()
    ]


def test_the_loss_is_every_real_targets_nll_over_their_count(tmp_path):
    """Two micro-batches with different numbers of real targets: the loss logged for step 11
    is Σ nll / Σ real targets of its whole batch under the model of step 10 (not the mean of
    the micro-batches' means, nor a mean over padded positions)."""
    run = tmp_path / "run"
    with no_noise():
        t = train(run, "plain", 10, micro=2)
        model = t.task.build_model()
        model.load_state_dict(load_run_checkpoint(run)["model"])
        tokens, mask = t.task.global_batch(10)  # step 11's batch
        with torch.no_grad():
            logits, _ = model.train()(tokens, mask)
        train(run, "plain", 11, micro=2, resume=True)
    nll = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), tokens.flatten(), reduction="none"
    ).view_as(mask)  # [B, L]
    want = float((nll * mask).sum() / mask.sum())
    halves = [float((nll[r] * mask[r]).sum() / mask[r].sum()) for r in (slice(0, 4), slice(4, 8))]
    assert int(mask[:4].sum()) != int(mask[4:].sum())
    assert abs(sum(halves) / 2 - want) > 1e-3  # a mean of means would be told apart
    assert metrics(run)[11]["loss"] == pytest.approx(want, rel=1e-5)
    assert metrics(run)[11]["tokens"] - metrics(run)[10]["tokens"] == int(mask.sum())


# ----------------------------------------------------------------------------- two ranks

JOBS = (  # name, model, steps, micro-batches, resumed from
    ("two", "plain", 10, 1, None),
    ("two_micro", "no_balance", 10, 2, None),
    ("two_glu", "glu", 10, 1, None),
    ("two_micro_capacity", "capacity", 10, 2, None),
    ("one_then_two", "plain", 10, 1, "one_at_5"),
)


def worker(rank: int, world: int, port: int, root: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        group = join_ranks(torch.device("cpu"), 60.0, 60.0)
        with no_noise():
            for name, model, steps, micro, source in JOBS:
                run = Path(root, name)
                train(run, model, steps, micro, resume=source is not None, group=group)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    with no_noise():
        train(root / "one", "plain", 10)
        train(root / "one_at_5", "plain", 5)
        train(root / "one_glu", "glu", 10)
        train(root / "one_micro_capacity", "capacity", 10, micro=2)
    shutil.copytree(root / "one_at_5", root / "one_then_two")
    mp.spawn(worker, args=(2, free_port(), str(root)), nprocs=2, join=True)
    return root


@pytest.mark.distributed
def test_two_ranks_with_unequal_targets_train_like_one_process(runs):
    task = CopyTask(MODELS["plain"], CopyTaskConfig(), runs)
    counts = [int(mask[:4].sum()) - int(mask[4:].sum()) for mask in
              (task.global_batch(step)[1] for step in range(10))]  # fmt: skip
    assert any(counts), "the ranks must hold different numbers of targets"
    assert_same(runs / "two", runs / "one", ("loss", "aux_loss", "load", "grad_norm"))
    assert_same(runs / "one_then_two", runs / "one", ("loss", "aux_loss", "load", "grad_norm"))


@pytest.mark.distributed
def test_two_ranks_accumulating_micro_batches_equal_one_process(runs, tmp_path):
    with no_noise():
        train(tmp_path / "one", "no_balance", 10)
    assert_same(runs / "two_micro", tmp_path / "one")


@pytest.mark.distributed
def test_each_micro_batch_routes_one_process_micro_batch_over_the_ranks(runs):
    """With balancing losses and a capacity, what a micro-batch routes matters: on 2 ranks each
    of the 2 micro-batches holds the lanes one process's micro-batch holds, so the balancing
    losses and the tokens kept are the same."""
    keys = ("loss", "aux_loss", "importance", "load", "fraction_dropped", "grad_norm")
    assert_same(runs / "two_micro_capacity", runs / "one_micro_capacity", keys)
    assert min(e["fraction_dropped"] for e in metrics(runs / "one_micro_capacity").values()) > 0


@pytest.mark.distributed
def test_an_extra_expert_tensor_is_sharded_reduced_and_saved_as_one(runs):
    """GLUExperts.w_gate is in no list of names: its module's marking alone makes it an
    expert tensor. Reduced as a replicated tensor, the two shards' gradients would be summed
    (and training would differ from one process); saved as one, rank 0's half would stand for
    the whole tensor."""
    assert_same(runs / "two_glu", runs / "one_glu")
    name = "moe.experts.w_gate"
    shards = sorted(runs.joinpath("two_glu").glob("experts-*"))
    assert len(shards) == 2
    for path in shards:
        assert torch.load(path, weights_only=True)["model"][name].shape[0] == 2  # E/W experts
    assert name not in torch.load(runs / "two_glu" / "checkpoint.pt", weights_only=True)["model"]


# ----------------------------------------------------------------------------- optimizer state


def test_optimizer_state_is_keyed_by_name_across_a_parameter_order_change(tmp_path):
    """Saved from a model that registers (first, second), loaded into one that registers
    (second, first) with two parameter groups: every moment lands on its own parameter (by
    position, the two equal-shaped tensors would swap moments silently)."""

    class Model(torch.nn.Module):
        def __init__(self, order):
            super().__init__()
            for name in order:
                self.register_parameter(name, torch.nn.Parameter(torch.zeros(3)))

    saved_model = Model(("first", "second"))
    optimizer = torch.optim.Adam(saved_model.parameters(), lr=0.1)
    saved_model.first.grad, saved_model.second.grad = torch.ones(3), -2 * torch.ones(3)
    optimizer.step()
    state = optimizer_state_by_name(optimizer, saved_model)
    assert set(state["state"]) == {"first", "second"}

    model = Model(("second", "first"))
    reordered = torch.optim.Adam([{"params": [model.second]}, {"params": [model.first]}])
    grouped = {"state": state["state"], "param_groups": [
        {**state["param_groups"][0], "params": ["second"]},
        {**state["param_groups"][0], "params": ["first"]},
    ]}  # fmt: skip
    load_optimizer_state_by_name(reordered, model, grouped, tmp_path)
    for name in ("first", "second"):
        want = optimizer.state[getattr(saved_model, name)]["exp_avg"]
        torch.testing.assert_close(reordered.state[getattr(model, name)]["exp_avg"], want)
    with pytest.raises(ValueError, match="saved for other parameters"):
        load_optimizer_state_by_name(reordered, model, state, tmp_path)  # one group, not two
