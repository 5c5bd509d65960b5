"""The CPU's dispatch functions (gather into reused storage, combine a block of tokens at a
time) equal the plain autograd formulas other devices run: outputs and gradients, with dropped
pairs, unused slots, slot priority and no rows at all."""

from __future__ import annotations

import pytest
import torch

from lstm_moe.moe.dispatch import (
    _combine_by_slot,
    _CombineRows,
    _GatherRows,
    combine_rows,
    gather_rows,
    plan_dispatch,
)
from lstm_moe.moe.workspace import Workspace

CASES = {
    # name: (expert_index [T, K], n_experts, capacity, slot_priority)
    "dropless": ([[0, 2], [1, 0], [2, 1], [0, 1]], 3, None, False),
    "capacity drops": ([[0, 2], [0, 1], [0, 2], [0, 1], [2, 0]], 3, 2, False),
    "slot priority": ([[0, 2], [0, 1], [2, 0], [1, 0]], 3, 2, True),
    "unused slots": ([[0, -1, -1], [1, 2, -1], [-1, -1, -1], [2, 0, 1]], 3, None, False),
    "nothing routed": ([[-1], [-1], [-1]], 2, None, False),
}


def _inputs(case, dtype):
    index, n_experts, capacity, slot_priority = CASES[case]
    expert_index = torch.tensor(index)
    plan = plan_dispatch(expert_index, n_experts, capacity, slot_priority)
    generator = torch.Generator().manual_seed(3)
    n_rows, width = plan.pair_index.numel(), 5
    expert_out = torch.randn(n_rows, width, dtype=dtype, generator=generator, requires_grad=True)
    gates = torch.rand(*expert_index.shape, dtype=dtype, generator=generator)
    gates = gates.masked_fill(expert_index < 0, 0.0).requires_grad_()
    return plan, expert_out, gates


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blockwise_combine_equals_the_by_slot_formula(case, dtype, monkeypatch):
    """(A combine that fits in one block takes the by-slot formula itself.)"""
    # Blocks of two tokens, so that several blocks run even at these sizes.
    monkeypatch.setattr("lstm_moe.moe.dispatch._COMBINE_BLOCK_ELEMENTS", 10)
    plan, expert_out, gates = _inputs(case, dtype)
    grad_y = torch.randn(plan.n_tokens, expert_out.shape[1], dtype=dtype)
    want = _combine_by_slot(expert_out, gates, plan)
    want_grads = torch.autograd.grad(want, (expert_out, gates), grad_y, allow_unused=True)
    got = combine_rows(expert_out, gates, plan, Workspace())
    assert type(got.grad_fn).__name__ == "_CombineRowsBackward"
    got_grads = torch.autograd.grad(got, (expert_out, gates), grad_y)
    torch.testing.assert_close(got, want)
    for got_grad, want_grad, tensor in zip(got_grads, want_grads, (expert_out, gates), strict=True):
        want_grad = torch.zeros_like(tensor) if want_grad is None else want_grad
        torch.testing.assert_close(got_grad, want_grad)


def test_blockwise_combine_passes_gradcheck(monkeypatch):
    monkeypatch.setattr("lstm_moe.moe.dispatch._COMBINE_BLOCK_ELEMENTS", 10)
    plan, expert_out, gates = _inputs("capacity drops", torch.float64)
    assert torch.autograd.gradcheck(
        lambda out, g: _CombineRows.apply(out, g, plan, Workspace()), (expert_out, gates)
    )


def test_a_dropped_slot_adds_zero_even_next_to_inf(monkeypatch):
    """Dropped slots are zeroed, not multiplied by a zero gate: inf · 0 would be NaN."""
    monkeypatch.setattr("lstm_moe.moe.dispatch._COMBINE_BLOCK_ELEMENTS", 10)
    plan, expert_out, gates = _inputs("capacity drops", torch.float32)
    expert_out = expert_out.detach().clone()
    expert_out[0] = float("inf")  # row 0 belongs to one kept pair only
    got = combine_rows(expert_out, gates.detach(), plan, Workspace())
    assert torch.isnan(got).sum() == 0
    assert torch.isinf(got).any(dim=1).sum() == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gather_into_the_workspace_equals_index_select(dtype):
    plan, _, _ = _inputs("capacity drops", dtype)
    x = torch.randn(plan.n_tokens, 4, dtype=dtype, requires_grad=True)
    grad = torch.randn(plan.token_index.numel(), 4, dtype=dtype)
    want = x.index_select(0, plan.token_index)
    (want_grad,) = torch.autograd.grad(want, x, grad)
    got = gather_rows(x, plan, Workspace())
    (got_grad,) = torch.autograd.grad(got, x, grad)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)
    x64 = x.detach().double().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v: _GatherRows.apply(v, plan.token_index, Workspace()), (x64,)
    )
