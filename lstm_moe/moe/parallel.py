"""Expert parallelism (Shazeer et al. 2017, §3.1): the gating network and everything outside
the MoE layer are data-parallel (each rank routes its own tokens with replicated weights), the
experts are sharded, and every (token, expert) pair travels to the rank holding its expert and
back. Each expert then sees the pairs of all ranks, a batch that grows with the number of ranks.

Rank r of W holds the contiguous block of experts [r·L, (r+1)·L), L = E / W. One call of
`mix_experts`:

1. each rank counts its pairs per expert; one all-gather gives every rank the counts of every
   rank, [W, E], and the number of (real, under a mask) tokens of the global batch;
2. the capacity, computed from the global token count, is handed out to ranks in rank order
   (under slot priority: first choices of every rank, then second choices, ...), so the pairs
   kept are exactly those one process keeps on the concatenated batch
   [rank 0's tokens; rank 1's tokens; ...]; dropped pairs are never sent;
3. the dispatcher sorts this rank's kept pairs by expert, which makes the rows for each
   destination rank contiguous, and an all-to-all with unequal split sizes sends them;
4. the received rows, ordered (source rank, expert, priority), are stably re-sorted by expert
   into (expert, source rank, priority) order, run through the local experts as one grouped
   product, put back, and returned by the reverse all-to-all; each rank mixes the rows of its
   own tokens with their gates (Eq. 1). (Each row's result is independent of the others', so
   the order within an expert only has to be the same at every world size for equal sums.)

With one process every collective is the identity and the re-sort is skipped (it would be the
identity permutation): a plain MoELayer runs this same code.

Gradients flow through both all-to-alls and through the routers' batch sums (ParallelGroup.sum,
whose backward sums the gradients of every rank's copy), so what each rank computes is its share
of the gradient of Σ_r loss_r: an expert's gradient is complete on the rank that holds it, and
the gradients of replicated parameters (router, everything outside the layer) must be summed
over ranks. A training loop that averages those instead (DistributedDataParallel) optimises
(1/W)·Σ_r loss_r, and must divide the expert gradients by W to match.

Index letters: T tokens of this rank, K slots per token, E experts, W ranks, L = E / W experts
per rank, D model width, N rows this rank sends, M rows it receives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .dispatch import (
    DispatchPlan,
    ExpertChoice,
    combine_rows,
    expert_capacity,
    gather_rows,
    plan_choice,
    plan_dispatch,
)
from .workspace import Workspace


class _SumOverRanks(torch.autograd.Function):
    """Σ over ranks of x. Every rank holds a copy of the sum, so the gradient of x is the sum
    over ranks of the gradients of those copies: the backward is the same all-reduce."""

    @staticmethod
    def forward(ctx, x: Tensor, process_group: dist.ProcessGroup) -> Tensor:
        ctx.process_group = process_group
        total = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=process_group)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.process_group)
        return grad, None


class _AllToAll(torch.autograd.Function):
    """Rows cut into blocks of send_counts[d] rows, block d sent to rank d; the blocks received
    (recv_counts[s] rows from rank s) concatenated in rank order. The backward sends the
    gradients back along the same routes: the all-to-all with the counts swapped."""

    @staticmethod
    def forward(
        ctx,
        rows: Tensor,
        send_counts: list[int],
        recv_counts: list[int],
        process_group: dist.ProcessGroup,
    ) -> Tensor:
        ctx.counts, ctx.process_group = (send_counts, recv_counts), process_group
        received = rows.new_empty(sum(recv_counts), *rows.shape[1:])
        dist.all_to_all_single(
            received, rows.contiguous(), recv_counts, send_counts, group=process_group
        )
        return received

    @staticmethod
    def backward(ctx, grad: Tensor):
        send_counts, recv_counts = ctx.counts
        grad_rows = grad.new_empty(sum(send_counts), *grad.shape[1:])
        dist.all_to_all_single(
            grad_rows, grad.contiguous(), send_counts, recv_counts, group=ctx.process_group
        )
        return grad_rows, None, None, None


class ParallelGroup:
    """The ranks whose local batches make up one batch, and which split the experts: the one
    wrapper around torch.distributed that the layer, the training engine and evaluation share.

    process_group: a torch.distributed group, or None for this process alone. With one rank
    every collective below is the identity and torch.distributed is never called.
    host_group: a gloo group for small host-side values (token counts, a time budget), so
    they never wait on a GPU stream; the process group itself when it is gloo. io_group: a
    gloo group with a long timeout, for waits that last as long as a disk write (checkpoints).
    Both default to process_group. local_rank: this rank's GPU on its machine. owns_group: the
    group was created for this process, and close() destroys it.
    """

    def __init__(
        self,
        process_group: dist.ProcessGroup | None = None,
        *,
        host_group: dist.ProcessGroup | None = None,
        io_group: dist.ProcessGroup | None = None,
        local_rank: int | None = None,
        owns_group: bool = False,
    ) -> None:
        self.process_group = process_group
        self.host_group = process_group if host_group is None else host_group
        self.io_group = process_group if io_group is None else io_group
        self.owns_group = owns_group
        if process_group is None:
            self.world_size, self.rank = 1, 0
        else:
            self.world_size = dist.get_world_size(process_group)
            self.rank = dist.get_rank(process_group)
        self.local_rank = self.rank if local_rank is None else local_rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world_size}"

    def print(self, *args, **kwargs) -> None:
        """print() on rank 0 only."""
        if self.is_main:
            print(*args, **kwargs)

    def device(self, device: torch.device) -> torch.device:
        """One GPU per local rank."""
        if self.world_size > 1 and device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False

    def sum_host(self, values: list[float]) -> list[float]:
        """Σ over ranks of a few host numbers (float64 on the host group, exact for integer
        counts below 2^53): no GPU stream is waited on."""
        if self.world_size == 1:
            return list(values)
        x = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(x, group=self.host_group)
        return x.tolist()

    def broadcast_float(self, value: float) -> float:
        """Rank 0's value on every rank: decisions (a time budget) must agree."""
        if self.world_size == 1:
            return value
        x = torch.tensor([value], dtype=torch.float64)
        dist.broadcast(x, src=0, group=self.host_group)
        return float(x)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.host_group)

    def barrier_for_io(self) -> None:
        """A barrier whose wait includes other ranks' disk writes: it gives up only after the
        checkpoint timeout, not the collective one."""
        if self.world_size > 1:
            dist.barrier(group=self.io_group)

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

    def expert_range(self, n_experts: int) -> tuple[int, int]:
        """[first, last) of the global expert ids this rank holds."""
        if n_experts % self.world_size:
            raise ValueError(
                f"n_experts ({n_experts}) must be a multiple of the number of ranks "
                f"({self.world_size}) for expert parallelism"
            )
        per_rank = n_experts // self.world_size
        return self.rank * per_rank, (self.rank + 1) * per_rank

    def sum(self, x: Tensor) -> Tensor:
        """Σ over ranks of x (same shape on every rank), differentiable: the backward sums the
        gradients of every rank's copy of the result (every rank must run it)."""
        if self.world_size == 1:
            return x
        return _SumOverRanks.apply(x, self.process_group)

    def gather(self, x: Tensor) -> Tensor:
        """Every rank's x (same shape on every rank), stacked in rank order: [W, *x.shape].
        No gradient."""
        if self.world_size == 1:
            return x.detach().unsqueeze(0)
        x = x.detach().contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x, group=self.process_group)
        return torch.stack(parts)

    def gather_batch(self, x: Tensor) -> tuple[Tensor, int]:
        """Every rank's rows x[T_r, ...] (T_r may differ) concatenated in rank order,
        [Σ_r T_r, ...], and the index of this rank's first row in it. No gradient."""
        if self.world_size == 1:
            return x.detach(), 0
        sizes = self.gather(torch.tensor(x.shape[0], device=x.device)).tolist()  # [W]
        padded = x.detach().new_zeros(max(sizes), *x.shape[1:])
        padded[: x.shape[0]] = x.detach()
        everyone = self.gather(padded)  # [W, max T_r, ...]
        rows = torch.cat([everyone[r, :n] for r, n in enumerate(sizes)])
        return rows, sum(sizes[: self.rank])

    def all_to_all(self, rows: Tensor, send_counts: Tensor, recv_counts: Tensor) -> Tensor:
        """Send rows[N, ...], cut into W consecutive blocks of send_counts[d] rows, block d to
        rank d; return the blocks received, in rank order: [Σ recv_counts, ...].
        Differentiable: the backward sends the gradients back along the same routes."""
        if self.world_size == 1:
            return rows
        return _AllToAll.apply(rows, send_counts.tolist(), recv_counts.tolist(), self.process_group)


@dataclass
class ExpertDispatch:
    """What one call of `mix_experts` did, over the batch of all ranks.

    plan: this rank's kept pairs, sorted by expert (the rows it sent, in that order).
    rows_per_expert: [E] int64 rows each expert computed (after capacity).
    routed_per_expert: [E] int64 pairs routed to each expert (before capacity).
    n_tokens: tokens in the global batch (real ones only, under a mask).
    """

    plan: DispatchPlan
    rows_per_expert: Tensor
    routed_per_expert: Tensor
    n_tokens: int


def share_capacity(routed: Tensor, capacity: int | None) -> Tensor:
    """Pairs each rank keeps for each expert: [W, E] int64.

    routed: [W, E] pairs each rank routed to each expert, or [W, C, E] split into priority
    classes (slots, under slot priority), every class before the next. An expert's capacity is
    handed out class by class and, within a class, to ranks in rank order, as one process on
    the concatenated batch [rank 0's tokens; rank 1's; ...] gives it to the earliest pairs;
    None (dropless) keeps every pair. What a rank keeps is a prefix of its own pairs in the
    same order (a later class gets capacity only once every rank's earlier classes fit).
    """
    if capacity is None:
        return routed if routed.dim() == 2 else routed.sum(1)
    if routed.dim() == 2:
        routed = routed.unsqueeze(1)  # one class
    world, classes, n_experts = routed.shape
    in_order = routed.transpose(0, 1).reshape(classes * world, n_experts)  # [C*W, E]
    before = in_order.cumsum(0) - in_order  # [C*W, E] pairs that come first
    kept = (capacity - before).clamp(min=0).minimum(in_order)
    return kept.view(classes, world, n_experts).sum(0)


def _expert_major_order(from_each: Tensor) -> Tensor | None:
    """The permutation that takes received rows from (source rank, expert, priority) order to
    (expert, source rank, priority) order, or None where the two are the same (one source rank or
    one expert). from_each: [W, L] rows from each rank for each local expert. Returns [M]."""
    world, per_rank = from_each.shape
    if world == 1 or per_rank == 1:
        return None
    local_expert = torch.arange(per_rank, device=from_each.device).repeat(world)  # [W*L]
    expert_of_row = torch.repeat_interleave(local_expert, from_each.reshape(-1))  # [M]
    return torch.argsort(expert_of_row, stable=True)


def _routed_counts(expert_index: Tensor, n_experts: int, per_slot: bool) -> Tensor:
    """[C, E] int64 pairs routed to each expert, C = K slots if per_slot else 1; slots marked
    -1 are not counted."""
    flat = torch.where(expert_index < 0, n_experts, expert_index)  # [T, K], unused past the end
    if per_slot:
        slots = expert_index.shape[1]
        offsets = torch.arange(slots, device=flat.device) * (n_experts + 1)  # [K]
        flat = flat + offsets
        counts = torch.bincount(flat.reshape(-1), minlength=slots * (n_experts + 1))
        return counts.view(slots, n_experts + 1)[:, :n_experts]
    return torch.bincount(flat.reshape(-1), minlength=n_experts + 1)[:n_experts].unsqueeze(0)


def mix_experts(
    tokens: Tensor,
    expert_index: Tensor | None,
    gates: Tensor | None,
    experts: nn.Module,
    n_experts: int,
    group: ParallelGroup,
    capacity_factor: float | None = None,
    experts_per_token: int = 1,
    slot_priority: bool = False,
    mask: Tensor | None = None,
    workspace: Workspace | None = None,
    choice: ExpertChoice | None = None,
) -> tuple[Tensor, ExpertDispatch]:
    """Σ_slot gates · expert(token) (Eq. 1) for this rank's tokens, the experts spread over the
    ranks of `group` (see the module docstring for the steps).

    tokens: [T, D]; expert_index: [T, K] int64 global expert ids, -1 for an unused slot;
    gates: [T, K]. experts: this rank's L experts, called as experts(rows [M, D] sorted by
    expert, rows_per_expert [L]) -> [M, D]. capacity_factor: None for dropless, else each
    expert takes at most expert_capacity(global tokens, experts_per_token, E, capacity_factor)
    rows. slot_priority: capacity goes to every token's first choice before any second choice
    (plan_dispatch); K must then be the same on every rank. mask: [T] bool, True for a real
    token, or None (all real): masked tokens are never dispatched, whatever expert_index says,
    get output 0, and are not counted in the global token count that sizes the capacity.
    workspace: reused CPU buffers for the dispatch's rows and gradients (workspace.py).
    choice: the routing in the expert-major layout instead (expert_index and gates None): its
    pairs are dispatched as they are, with no capacity (the router has applied its own), and
    must leave masked tokens out.
    Returns ([T, D], ExpertDispatch). Every rank of the group must call it together.
    """
    if choice is not None:
        if expert_index is not None or gates is not None:
            raise ValueError("give either expert_index and gates or an ExpertChoice, not both")
        return _mix_choice(tokens, choice, experts, n_experts, group, mask, workspace)
    world, rank = group.world_size, group.rank
    group.expert_range(n_experts)  # refuses experts that do not split evenly over the ranks
    if mask is None:
        n_tokens = tokens.shape[0]
    else:
        keep = mask.unsqueeze(-1)  # [T, 1]
        expert_index = expert_index.masked_fill(~keep, -1)
        gates = gates.masked_fill(~keep, 0.0)
        n_tokens = int(mask.sum())  # real tokens
    # Counts per slot only where a capacity makes the slots' order matter.
    per_slot = slot_priority and capacity_factor is not None
    routed = _routed_counts(expert_index, n_experts, per_slot)  # [C, E]
    classes = routed.shape[0]
    counts = group.gather(torch.cat([routed.reshape(-1), routed.new_tensor([n_tokens])]))
    routed_all = counts[:, :-1].view(world, classes, n_experts)  # [W, C, E]
    total_tokens = n_tokens if world == 1 else int(counts[:, -1].sum())
    capacity = None
    if capacity_factor is not None:
        capacity = expert_capacity(total_tokens, experts_per_token, n_experts, capacity_factor)
    kept_all = share_capacity(routed_all, capacity)  # [W, E]
    plan = plan_dispatch(
        expert_index, n_experts, None if capacity is None else kept_all[rank], slot_priority
    )

    output = _run_plan(tokens, gates, plan, kept_all, experts, group, workspace)
    return output, ExpertDispatch(plan, kept_all.sum(0), routed_all.sum((0, 1)), total_tokens)


def _mix_choice(
    tokens: Tensor,
    choice: ExpertChoice,
    experts: nn.Module,
    n_experts: int,
    group: ParallelGroup,
    mask: Tensor | None,
    workspace: Workspace | None,
) -> tuple[Tensor, ExpertDispatch]:
    """mix_experts of an expert-major choice: its pairs, all kept, through the same steps."""
    group.expert_range(n_experts)  # refuses experts that do not split evenly over the ranks
    n_tokens = tokens.shape[0] if mask is None else int(mask.sum())
    rows = choice.rows_per_expert
    counts = group.gather(torch.cat([rows, rows.new_tensor([n_tokens])]))  # [W, E + 1]
    kept_all = counts[:, :-1]  # [W, E]
    total_tokens = int(counts[:, -1].sum())
    plan = plan_choice(choice, tokens.shape[0])
    output = _run_plan(tokens, choice.gates, plan, kept_all, experts, group, workspace)
    per_expert = kept_all.sum(0)
    return output, ExpertDispatch(plan, per_expert, per_expert, total_tokens)


def _run_plan(
    tokens: Tensor,
    gates: Tensor,
    plan: DispatchPlan,
    kept_all: Tensor,
    experts: nn.Module,
    group: ParallelGroup,
    workspace: Workspace | None,
) -> Tensor:
    """Steps 3-4 of the module docstring: this rank's planned rows to their experts' ranks, the
    experts, the rows back, and the mix with the gates. kept_all: [W, E] rows every rank sends
    to every expert. Returns [T, D]."""
    world, rank = group.world_size, group.rank
    blocks = kept_all.view(world, world, -1)  # [source, destination, local expert]
    send_counts = blocks[rank].sum(-1)  # [W]
    from_each = blocks[:, rank]  # [W, L]
    recv_counts = from_each.sum(-1)  # [W]
    rows = gather_rows(tokens, plan, workspace)  # [N, D]
    received = group.all_to_all(rows, send_counts, recv_counts)  # [M, D]
    order = _expert_major_order(from_each)
    if order is not None:
        received = received.index_select(0, order)
    expert_out = experts(received, from_each.sum(0))  # [M, D]
    if order is not None:
        expert_out = expert_out.new_zeros(expert_out.shape).index_copy(0, order, expert_out)
    returned = group.all_to_all(expert_out, recv_counts, send_counts)  # [N, D], plan order
    return combine_rows(returned, gates, plan, workspace)  # [T, D]


def expert_tensor_names(module: nn.Module) -> set[str]:
    """State-dict names of the expert tensors in `module`: [E/W, ...] shards by expert, which
    expert parallelism splits over ranks instead of replicating. A module says that it holds
    such tensors by setting `holds_expert_shard = True` (BatchedExperts does): every parameter
    and buffer it registers itself is then an expert tensor, whatever its name, so a new one
    (a GLU's gate, say) is sharded, reduced and saved with the others."""
    names = set()
    for prefix, sub in module.named_modules():
        if getattr(sub, "holds_expert_shard", False):
            owned = [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]
            names.update(f"{prefix}.{name}" if prefix else name for name, _ in owned)
    return names


def shard_state_dict(
    state: dict[str, Tensor], group: ParallelGroup, expert_names: set[str]
) -> dict[str, Tensor]:
    """This rank's share of a full (one-process) state dict: every expert tensor [E, ...]
    (expert_names, from expert_tensor_names) is cut to this rank's experts [L, ...]; every
    other tensor is replicated and kept as it is."""
    shard = {}
    for name, value in state.items():
        if name in expert_names:
            first, last = group.expert_range(value.shape[0])
            value = value[first:last].clone()
        shard[name] = value
    return shard


def gather_state_dict(
    state: dict[str, Tensor], group: ParallelGroup, expert_names: set[str]
) -> dict[str, Tensor]:
    """The full state dict, on every rank, from each rank's shard: expert tensors [L, ...] are
    gathered in rank order into [E, ...]. Every rank of the group must call it together."""
    full = {}
    for name, value in state.items():
        if name in expert_names:
            value = group.gather(value).flatten(0, 1)  # [W, L, ...] -> [E, ...]
        full[name] = value
    return full


__all__ = [
    "ExpertDispatch",
    "ParallelGroup",
    "expert_tensor_names",
    "gather_state_dict",
    "mix_experts",
    "shard_state_dict",
    "share_capacity",
]
