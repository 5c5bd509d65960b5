"""Training over the ranks that `torchrun` starts: mixed data and expert parallelism (§3.1).

Every rank holds a replica of the embedding, the LSTMs, the gating networks and the softmax, and
its share of every MoE layer's experts (lstm_moe.moe.parallel). Rank r of W reads lanes
[r·B/W, (r+1)·B/W) of the one-process batch layout and minimises

    loss_r = Σ(nll over its tokens) / (tokens of the global batch) + aux_loss / W,

so that Σ_r loss_r is the one-process loss. The MoE layers hand each rank its share of the
gradient of that sum: expert gradients are complete on the rank that holds them, and the
gradients of replicated parameters are summed over ranks here (an all-reduce in buckets) before
they are clipped and applied. The global gradient norm counts each replicated parameter once
and every rank's expert shard.

World size 1 never touches torch.distributed.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lstm_moe.moe.parallel import is_expert_tensor

# Replicated gradients are summed in flat buckets of at most this many elements: few
# collectives, and at most this much extra memory (the embedding and softmax run to 10^8).
BUCKET_NUMEL = 16 * 2**20


@dataclass
class Distributed:
    """This process's place among the ranks. process_group is None for one process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    process_group: dist.ProcessGroup | None = None
    owns_group: bool = False
    # gloo, with the long timeout of waits that last as long as a disk write (checkpoints).
    io_group: dist.ProcessGroup | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(
        cls, device: torch.device, timeout_s: float, io_timeout_s: float = 1800.0
    ) -> Distributed:
        """Join the ranks described by torchrun's RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
        MASTER_PORT: gloo on the CPU, NCCL on CUDA. A collective that waits longer than
        timeout_s (a rank died or hangs) raises instead of blocking forever; barrier_for_io
        waits up to io_timeout_s. Without WORLD_SIZE > 1 this is one process, and
        torch.distributed is left alone. A group that is already initialised (by a caller) is
        used as it is."""
        if dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
            group = dist.group.WORLD if world > 1 else None
            local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
            io_group = cls._new_io_group(io_timeout_s) if world > 1 else None
            return cls(dist.get_rank(), world, local_rank, group, False, io_group)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(
            backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s)
        )
        io_group = cls._new_io_group(io_timeout_s)
        return cls(rank, world, local_rank, dist.group.WORLD, True, io_group)

    @staticmethod
    def _new_io_group(timeout_s: float) -> dist.ProcessGroup:
        """Every rank must call it together, right after joining."""
        return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))

    def device(self, device: torch.device) -> torch.device:
        """One GPU per local rank."""
        if self.world_size > 1 and device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False

    def print(self, *args, **kwargs) -> None:
        """print() on rank 0 only."""
        if self.is_main:
            print(*args, **kwargs)

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world_size}"

    # ------------------------------------------------------------------ collectives

    def sum(self, x: Tensor) -> Tensor:
        """Σ over ranks of x, no gradient (the identity for one process)."""
        if self.world_size == 1:
            return x
        x = x.detach().clone()
        dist.all_reduce(x, group=self.process_group)
        return x

    def broadcast_float(self, value: float) -> float:
        """Rank 0's value on every rank: decisions (a time budget) must agree."""
        if self.world_size == 1:
            return value
        x = torch.tensor([value], dtype=torch.float64)
        if dist.get_backend(self.process_group) == "nccl":
            x = x.cuda()
        dist.broadcast(x, src=0, group=self.process_group)
        return float(x)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.process_group)

    def count_differing_from_main(self, values: tuple[float, ...]) -> int:
        """How many ranks hold other values than rank 0, known to every rank. On the I/O group:
        ranks reach it after reading a checkpoint, each at its own disk's speed."""
        if self.world_size == 1:
            return 0
        mine = torch.tensor(values, dtype=torch.float64)
        main = mine.clone()
        dist.broadcast(main, src=0, group=self.io_group)
        differs = torch.tensor([float(not torch.equal(mine, main))])
        dist.all_reduce(differs, group=self.io_group)
        return int(differs)

    def barrier_for_io(self) -> None:
        """A barrier whose wait includes other ranks' disk writes: it gives up only after the
        checkpoint timeout, not the collective one."""
        if self.world_size > 1:
            dist.barrier(group=self.io_group)


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The trained parameters, as (replicated, expert shards)."""
    replicated, experts = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (experts if is_expert_tensor(name) else replicated).append(p)
    return replicated, experts


def sum_replicated_grads(params: list[nn.Parameter], ctx: Distributed) -> None:
    """Replace each replicated parameter's gradient by its sum over ranks (a missing gradient
    counts as zero, so every rank flattens the same layout)."""
    if ctx.world_size == 1:
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
            dist.all_reduce(flat, group=ctx.process_group)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
        bucket, filled = [], 0
        if grad is not None:
            if grad.numel() > BUCKET_NUMEL:  # a large tensor is reduced in place, alone
                dist.all_reduce(grad, group=ctx.process_group)
            else:
                bucket, filled = [grad], grad.numel()


def clip_global_grad_norm(
    replicated: list[nn.Parameter], experts: list[nn.Parameter], max_norm: float, ctx: Distributed
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

    total_norm = (squares(grads) + ctx.sum(squares(expert_grads))).sqrt()
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


def fail(ctx: Distributed, error: BaseException) -> None:
    """The message of a rank whose collective failed: another rank died or stopped answering
    within dist_timeout."""
    print(
        f"error: {ctx.describe()}: a collective failed ({type(error).__name__}: {error}). "
        "Another rank probably died or stopped answering within --dist_timeout; resume from "
        "the last checkpoint with --resume, at this or another number of ranks.",
        file=sys.stderr,
    )


__all__ = [
    "Distributed",
    "clip_global_grad_norm",
    "fail",
    "rank_seed",
    "split_parameters",
    "sum_replicated_grads",
]
