"""Loading a multi-rank checkpoint: the one-process state for evaluation, or one rank's
experts at any world size, read only from the shard files that hold them."""

from __future__ import annotations

import pytest
import torch

from lstm_moe.engine.checkpoint import load_run_checkpoint, save_checkpoint, shard_path
from lstm_moe.moe.parallel import ParallelGroup

N_EXPERTS, SAVED_WORLD, STEP = 8, 4, 5
W_IN, W_OUT = "moe.experts.w_in", "moe.experts.w_out"
# Optimizer state is keyed by parameter name: an expert tensor's and a replicated one's.
EXPERT_ID, OTHER_ID = W_IN, "lstm.weight"
EXPERTS = {W_IN, W_OUT}


def group_of(rank: int, world_size: int) -> ParallelGroup:
    """A ParallelGroup's view of one rank, without a process group (only ranges are used)."""
    group = ParallelGroup()
    group.rank, group.world_size = rank, world_size
    return group


@pytest.fixture
def full():
    generator = torch.Generator().manual_seed(0)
    return {
        W_IN: torch.randn(N_EXPERTS, 3, 5, generator=generator),
        W_OUT: torch.randn(N_EXPERTS, 5, 3, generator=generator),
        "exp_avg": torch.randn(N_EXPERTS, 3, 5, generator=generator),
        "lstm.weight": torch.randn(4, 4, generator=generator),
    }


def common(full) -> dict:
    return {
        "task": "test",
        "model_config": {},
        "task_config": {},
        "train_config": {},
        "schedule": {},
        "task_state": {},
        "tokens": 0,
        "elapsed": 0.0,
        "step": STEP,
        "model": {"lstm.weight": full["lstm.weight"]},
        "optimizer": {
            "state": {OTHER_ID: {"step": torch.tensor(3.0), "exp_avg": torch.ones(4, 4)}},
            "param_groups": [],
        },
        "rng": torch.tensor([100], dtype=torch.uint8),
    }


def save_sharded(run_dir, full) -> None:
    per_rank = N_EXPERTS // SAVED_WORLD
    for rank in range(SAVED_WORLD):
        part = slice(rank * per_rank, (rank + 1) * per_rank)
        save_checkpoint(
            shard_path(run_dir, STEP, rank, SAVED_WORLD),
            {
                "step": STEP,
                "rank": rank,
                "world_size": SAVED_WORLD,
                "model": {W_IN: full[W_IN][part], W_OUT: full[W_OUT][part]},
                "optimizer_state": {
                    EXPERT_ID: {"step": torch.tensor(3.0), "exp_avg": full["exp_avg"][part]}
                },
                "rng": torch.tensor([rank], dtype=torch.uint8),
            },
        )
    save_checkpoint(run_dir / "checkpoint.pt", {**common(full), "expert_shards": SAVED_WORLD})


def check_experts(ckpt, full, first: int, last: int) -> None:
    for name in (W_IN, W_OUT):
        assert torch.equal(ckpt["model"][name], full[name][first:last]), name
    moments = ckpt["optimizer"]["state"][EXPERT_ID]
    assert torch.equal(moments["exp_avg"], full["exp_avg"][first:last])
    assert moments["step"].item() == 3.0
    assert torch.equal(ckpt["model"]["lstm.weight"], full["lstm.weight"])
    assert torch.equal(ckpt["optimizer"]["state"][OTHER_ID]["exp_avg"], torch.ones(4, 4))


def test_full_state_from_shards(tmp_path, full):
    save_sharded(tmp_path, full)
    ckpt = load_run_checkpoint(tmp_path)
    check_experts(ckpt, full, 0, N_EXPERTS)
    assert sorted(ckpt["rngs"]) == [0, 1, 2, 3]
    assert [int(ckpt["rngs"][r][0]) for r in range(4)] == [0, 1, 2, 3]


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_each_rank_gets_its_experts_at_any_world_size(tmp_path, full, world):
    save_sharded(tmp_path, full)
    per_rank = N_EXPERTS // world
    for rank in range(world):
        ckpt = load_run_checkpoint(tmp_path, group=group_of(rank, world), expert_names=EXPERTS)
        check_experts(ckpt, full, rank * per_rank, (rank + 1) * per_rank)
        if world == SAVED_WORLD:  # the same number of ranks resumes each rank's own stream
            assert int(ckpt["rngs"][rank][0]) == rank


def test_a_rank_reads_only_the_shards_holding_its_experts(tmp_path, full):
    save_sharded(tmp_path, full)
    # Rank 0 of 2 holds experts 0-3, saved by ranks 0 and 1: a broken shard 3 is never read
    # (shard 0 is always opened, for its list of tensors).
    shard_path(tmp_path, STEP, 3, SAVED_WORLD).write_bytes(b"not a checkpoint")
    ckpt = load_run_checkpoint(tmp_path, group=group_of(0, 2), expert_names=EXPERTS)
    check_experts(ckpt, full, 0, 4)
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_run_checkpoint(tmp_path, group=group_of(1, 2), expert_names=EXPERTS)


def test_a_missing_shard_is_named(tmp_path, full):
    save_sharded(tmp_path, full)
    shard_path(tmp_path, STEP, 2, SAVED_WORLD).unlink()
    with pytest.raises(FileNotFoundError, match=r"experts-step5-rank2-of4\.pt"):
        load_run_checkpoint(tmp_path, group=group_of(0, 2))


def test_one_process_checkpoint_sliced_per_rank(tmp_path, full):
    state = common(full)
    state["model"].update({W_IN: full[W_IN], W_OUT: full[W_OUT]})
    state["optimizer"]["state"][EXPERT_ID] = {
        "step": torch.tensor(3.0),
        "exp_avg": full["exp_avg"],
    }
    save_checkpoint(tmp_path / "checkpoint.pt", state)
    check_experts(load_run_checkpoint(tmp_path), full, 0, N_EXPERTS)
    for rank in range(4):
        ckpt = load_run_checkpoint(tmp_path, group=group_of(rank, 4), expert_names=EXPERTS)
        check_experts(ckpt, full, 2 * rank, 2 * rank + 2)
        assert list(ckpt["rngs"]) == [0]
