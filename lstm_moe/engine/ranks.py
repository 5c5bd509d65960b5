"""Training over the ranks that `torchrun` starts: mixed data and expert parallelism (§3.1).

Every rank holds a replica of everything outside the experts (embedding, LSTMs or attention,
gating networks, softmax) and its share of every MoE layer's experts (lstm_moe.moe.parallel).
Each rank computes its task's summed loss over its own targets, and minimises

    loss_r = Σ(loss over its targets) / (targets of the global batch) + aux_loss / (W · M)

for each of the step's M micro-batches, so that Σ_r loss_r is the one-process loss of the
whole batch, whatever the number of targets each rank holds. The MoE layers hand each rank its
share of the gradient of that sum: expert gradients are complete on the rank that holds them,
and the gradients of replicated parameters are summed over ranks here (an all-reduce in
buckets) before they are clipped and applied. The global gradient norm counts each replicated
parameter once and every rank's expert shard.

World size 1 never touches torch.distributed.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lstm_moe.moe.parallel import ParallelGroup, expert_tensor_names

# Replicated gradients are summed in flat buckets of at most this many elements: few
# collectives, and at most this much extra memory (the embedding and softmax run to 10^8).
BUCKET_NUMEL = 16 * 2**20


def join_ranks(device: torch.device, timeout_s: float, io_timeout_s: float = 1800.0):
    """This process's ParallelGroup: the ranks described by torchrun's RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR and MASTER_PORT, gloo on the CPU and NCCL on CUDA. A collective
    that waits longer than timeout_s (a rank died or hangs) raises instead of blocking
    forever; barrier_for_io waits up to io_timeout_s. Without WORLD_SIZE > 1 this is one
    process, and torch.distributed is left alone. A group that is already initialised (by a
    caller) is used as it is."""
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        if world == 1:
            return ParallelGroup()
        local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        groups = _side_groups(timeout_s, io_timeout_s)
        return ParallelGroup(dist.group.WORLD, local_rank=local_rank, **groups)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return ParallelGroup()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(
        backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s)
    )
    return ParallelGroup(
        dist.group.WORLD,
        local_rank=local_rank,
        owns_group=True,
        **_side_groups(timeout_s, io_timeout_s),
    )


def _side_groups(timeout_s: float, io_timeout_s: float) -> dict:
    """The gloo groups of host values and of checkpoint waits. Every rank must call it
    together, right after joining."""
    host = None
    if dist.get_backend() != "gloo":
        host = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    io = dist.new_group(backend="gloo", timeout=timedelta(seconds=io_timeout_s))
    return {"host_group": host, "io_group": io}


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The trained parameters, as (replicated, expert shards): the experts are the tensors of
    the modules that say they hold an expert shard (parallel.expert_tensor_names)."""
    expert_names = expert_tensor_names(model)
    replicated, experts = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (experts if name in expert_names else replicated).append(p)
    return replicated, experts


def sum_replicated_grads(params: list[nn.Parameter], group: ParallelGroup) -> None:
    """Replace each replicated parameter's gradient by its sum over ranks (a missing gradient
    counts as zero, so every rank flattens the same layout)."""
    if group.world_size == 1:
        return
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    bucket: list[Tensor] = []
    filled = 0
    for grad in [*grads, None]:
        if grad is not None and filled + grad.numel() <= BUCKET_NUMEL:
            bucket.append(grad)
            filled += grad.numel()
            continue
        if bucket:
            flat = torch.cat([g.reshape(-1) for g in bucket])  # [filled]
            dist.all_reduce(flat, group=group.process_group)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
        bucket, filled = [], 0
        if grad is not None:
            if grad.numel() > BUCKET_NUMEL:  # a large tensor is reduced in place, alone
                dist.all_reduce(grad, group=group.process_group)
            else:
                bucket, filled = [grad], grad.numel()


def clip_global_grad_norm(
    replicated: list[nn.Parameter],
    experts: list[nn.Parameter],
    max_norm: float,
    group: ParallelGroup,
) -> Tensor:
    """torch.nn.utils.clip_grad_norm_ over the whole model, sharded experts included: the
    replicated gradients (already summed, equal on every rank) count once, the squared norms
    of the expert shards are summed over ranks. Returns the norm before clipping."""
    grads = [p.grad for p in replicated if p.grad is not None]
    expert_grads = [p.grad for p in experts if p.grad is not None]
    device = (grads or expert_grads)[0].device

    def squares(tensors: list[Tensor]) -> Tensor:
        total = torch.zeros((), dtype=torch.float32, device=device)
        for g in tensors:
            total = total + g.detach().float().pow(2).sum()
        return total

    total_norm = (squares(grads) + group.sum(squares(expert_grads))).sqrt()
    # The clip coefficient of clip_grad_norm_, clamped so that small gradients are kept.
    coef = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
    for g in grads + expert_grads:
        g.mul_(coef.to(g.dtype))
    return total_norm


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank r > 0's random stream (dropout, router noise), drawn after
    the model: its own, so that ranks do not draw the same masks for different lanes. Rank 0
    keeps the one-process stream."""
    return (seed * 1_000_003 + rank) % 2**63


def fail(group: ParallelGroup, error: BaseException) -> None:
    """The message of a rank whose collective failed: another rank died or stopped answering
    within dist_timeout."""
    print(
        f"error: {group.describe()}: a collective failed ({type(error).__name__}: {error}). "
        "Another rank probably died or stopped answering within --dist_timeout; resume from "
        "the last checkpoint with --resume, at this or another number of ranks.",
        file=sys.stderr,
    )


__all__ = [
    "clip_global_grad_norm",
    "fail",
    "join_ranks",
    "rank_seed",
    "split_parameters",
    "sum_replicated_grads",
]
