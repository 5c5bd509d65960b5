"""The one dispatcher: moves tokens to experts and their outputs back. It has no parameters
and does not know what the experts compute; every router uses it.

Index letters: T tokens, K routing slots per token, P = T·K (token, slot) pairs,
N pairs kept (after capacity), E experts, D model width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class DispatchPlan:
    """Where each kept (token, slot) pair goes, in expert-contiguous order.

    pair_index: [N] int64, flat index t·K + slot of each kept pair, sorted by expert and, within
        an expert, in priority order: token order (t, slot), or with slot priority
        (slot, t); capacity keeps the first pairs in that order.
    token_index: [N] int64, the token of each kept pair.
    rows_per_expert: [E] int64, rows each expert computes (after capacity).
    routed_per_expert: [E] int64, pairs routed to each expert (before capacity).
    """

    pair_index: Tensor
    token_index: Tensor
    rows_per_expert: Tensor
    routed_per_expert: Tensor
    n_tokens: int
    slots_per_token: int

    @property
    def n_dropped(self) -> Tensor:
        return self.routed_per_expert.sum() - self.rows_per_expert.sum()


def expert_capacity(n_tokens: int, k: int, n_experts: int, capacity_factor: float) -> int:
    """Rows one expert may take: ceil(capacity_factor · tokens · k / experts) (Switch §2.2)."""
    if capacity_factor <= 0:
        raise ValueError(
            f"capacity_factor must be > 0 (or None for dropless), got {capacity_factor}"
        )
    return max(1, math.ceil(capacity_factor * n_tokens * k / n_experts))


def plan_dispatch(
    expert_index: Tensor,
    n_experts: int,
    capacity: int | Tensor | None = None,
    slot_priority: bool = False,
) -> DispatchPlan:
    """Stable-sort the (token, slot) pairs by expert and apply a per-expert capacity.

    expert_index: [T, K] int64, -1 for an unused slot. capacity: rows per expert (an int for
    every expert, or [E] int64, one each: what expert parallelism leaves to this rank), or None
    for dropless. Pairs past an expert's capacity are dropped; their tokens get no output from
    that expert (the residual connection around the layer carries them). Which pairs come first:
    token order (t, slot), the batch order of the 2017 layer; or with slot_priority, every
    token's first choice before any token's second choice (slot, t), as GShard's top-2 gate
    gives its second choices only the capacity the first choices left.
    """
    n_tokens, slots = expert_index.shape
    if slot_priority:
        # Sort the pairs in (slot, t) order; pair_of_position maps back to t·K + slot.
        flat_expert = expert_index.t().reshape(-1)  # [P]
        pair_of_position = torch.arange(n_tokens * slots, device=expert_index.device)
        pair_of_position = pair_of_position.view(n_tokens, slots).t().reshape(-1)  # [P]
    else:
        flat_expert = expert_index.reshape(-1)  # [P]
    # Unused slots go to a sentinel bucket E, which sorts last and is never computed.
    flat_expert = torch.where(flat_expert < 0, n_experts, flat_expert)
    sorted_expert, order = torch.sort(flat_expert, stable=True)  # [P], [P]
    routed = torch.bincount(flat_expert, minlength=n_experts + 1)[:n_experts]  # [E]
    if capacity is None:
        keep = sorted_expert < n_experts  # [P]
        rows = routed
    else:
        starts = torch.cumsum(routed, 0) - routed  # [E]
        bucket = sorted_expert.clamp(max=n_experts - 1)
        rank_in_expert = torch.arange(order.numel(), device=order.device) - starts[bucket]
        limit = capacity[bucket] if isinstance(capacity, Tensor) else capacity  # [P] or int
        keep = (sorted_expert < n_experts) & (rank_in_expert < limit)  # [P]
        rows = routed.clamp(max=capacity)
    pair_index = order[keep]  # [N]
    if slot_priority:
        pair_index = pair_of_position[pair_index]
    return DispatchPlan(
        pair_index=pair_index,
        token_index=torch.div(pair_index, slots, rounding_mode="floor"),
        rows_per_expert=rows,
        routed_per_expert=routed,
        n_tokens=n_tokens,
        slots_per_token=slots,
    )


def gather_rows(x: Tensor, plan: DispatchPlan) -> Tensor:
    """x: [T, D] -> [N, D], the input row of every kept pair, expert-contiguous."""
    return x.index_select(0, plan.token_index)


def combine_rows(expert_out: Tensor, gates: Tensor, plan: DispatchPlan) -> Tensor:
    """y_t = Σ_slot gate[t, slot] · expert_out[pair(t, slot)] (Eq. 1).

    expert_out: [N, D]; gates: [T, K]. Each output row is written back to its (token, slot)
    place, then each token's K rows are mixed by its gates and summed over the slots, so the
    forward sum is in a fixed order. Dropped and unused slots contribute zero.
    The mix runs in the gates' precision (float32 from every router), outside autocast: the
    gate gradient is the router's only signal from the task loss. Returns [T, D].
    """
    n_tokens, slots, width = plan.n_tokens, plan.slots_per_token, expert_out.shape[-1]
    by_slot = expert_out.new_zeros(n_tokens * slots, width)
    by_slot = by_slot.index_copy(0, plan.pair_index, expert_out)  # [P, D]
    by_slot = by_slot.view(n_tokens, slots, width)  # [T, K, D]
    dtype = torch.promote_types(gates.dtype, expert_out.dtype)
    with torch.autocast(device_type=expert_out.device.type, enabled=False):
        # An elementwise product summed over the K slots, in slot order: on the CPU a bmm of
        # T [1, K] x [K, D] products runs (and differentiates) matrix by matrix.
        weights = gates.to(dtype).unsqueeze(-1)  # [T, K, 1]
        return (by_slot.to(dtype) * weights).sum(1)  # [T, D]
