"""Every product path behind grouped_matmul equals a plain loop over experts, outputs and
both gradients: the per-expert GEMMs the CPU takes, the padded bmm of other devices and
dtypes, and the grouped kernel (torch._grouped_mm, CUDA's bf16 path, checked here on the CPU
in float32). Experts with no rows (first, in the middle, last), one expert with every row,
and no rows at all are included; so is the CPU's fused expert feed-forward."""

from __future__ import annotations

import pytest
import torch

from lstm_moe.moe.experts import (
    _balanced_bmm,
    _GroupedMatmul,
    _padded_bmm,
    _padded_feed_forward,
    _PerExpertFeedForward,
    _PerExpertMatmul,
    expert_feed_forward,
    grouped_matmul,
)
from lstm_moe.moe.workspace import Workspace

D, H = 12, 20  # rows of 48 and 80 bytes: the grouped kernel's 16-byte alignment holds
COUNTS = {
    "balanced": [3, 3, 3, 3],
    "empty experts": [0, 5, 0, 2, 4, 0],
    "one expert": [0, 0, 9, 0],
    "no rows": [0, 0, 0],
}


def reference(rows, weight, counts):
    """Expert by expert, row by row: out[i] = rows[i] @ weight[expert of row i]."""
    out, start = [], 0
    for expert, n in enumerate(counts):
        for i in range(start, start + n):
            out.append(rows[i] @ weight[expert])
        start += n
    return torch.stack(out) if out else rows @ weight[0]  # [0, H], still on the graph


PATHS = {
    "per_expert": lambda r, w, c: _PerExpertMatmul.apply(r, w, c),
    "padded_bmm": lambda r, w, c: _padded_bmm(r, w, torch.tensor(c)),
    "grouped_kernel": lambda r, w, c: _GroupedMatmul.apply(
        r, w, torch.cumsum(torch.tensor(c), 0, dtype=torch.int32)
    ),
    # Only for equal counts: the other cases run through grouped_matmul's own choice.
    "balanced_bmm": lambda r, w, c: (
        _balanced_bmm(r, w, c[0])
        if len(set(c)) == 1 and c[0]
        else grouped_matmul(r, w, torch.tensor(c))
    ),
}


@pytest.mark.parametrize("case", list(COUNTS))
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_each_product_path_equals_a_loop_over_experts(case, path, dtype):
    if path == "grouped_kernel" and dtype != torch.float32:
        pytest.skip("the grouped kernel is taken for bf16 on CUDA; its CPU build runs float32")
    counts = COUNTS[case]
    generator = torch.Generator().manual_seed(len(counts))
    rows = torch.randn(sum(counts), D, dtype=dtype, generator=generator, requires_grad=True)
    weight = torch.randn(len(counts), D, H, dtype=dtype, generator=generator, requires_grad=True)
    grad_out = torch.randn(sum(counts), H, dtype=dtype, generator=generator)

    want = reference(rows, weight, counts)
    want_rows, want_weight = torch.autograd.grad(want, (rows, weight), grad_out, allow_unused=True)
    got = PATHS[path](rows, weight, counts)
    got_rows, got_weight = torch.autograd.grad(got, (rows, weight), grad_out, allow_unused=True)

    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, want, **tol)
    if sum(counts):
        torch.testing.assert_close(got_rows, want_rows, **tol)
    want_weight = torch.zeros_like(weight) if want_weight is None else want_weight
    torch.testing.assert_close(got_weight, want_weight, **tol)
    for expert, n in enumerate(counts):
        if n == 0:  # an expert without rows has exactly zero gradient, never stale memory
            assert torch.equal(got_weight[expert], torch.zeros_like(got_weight[expert]))


def test_the_per_expert_gemms_pass_gradcheck():
    counts = [2, 0, 3, 1]
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(6, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(4, 3, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda r, w: _PerExpertMatmul.apply(r, w, counts), (rows, weight)
    )


def test_the_cpu_takes_the_per_expert_gemms_in_float32_and_float64():
    """grouped_matmul's dispatch on the CPU: what the layer's equivalence tests exercise;
    equal counts (the batchwise gate in training) take one bmm."""
    for dtype in (torch.float32, torch.float64):
        rows = torch.randn(4, D, dtype=dtype, requires_grad=True)
        weight = torch.randn(2, D, H, dtype=dtype, requires_grad=True)
        out = grouped_matmul(rows, weight, torch.tensor([1, 3]))
        assert type(out.grad_fn).__name__ == "_PerExpertMatmulBackward"
        out = grouped_matmul(rows, weight, torch.tensor([2, 2]))
        assert type(out.grad_fn.next_functions[0][0]).__name__ == "BmmBackward0"


def ffn_reference(rows, w_in, w_out, counts):
    """Expert by expert, row by row: relu(rows[i] @ w_in[e]) @ w_out[e]."""
    out, start = [], 0
    for expert, n in enumerate(counts):
        for i in range(start, start + n):
            out.append(torch.relu(rows[i] @ w_in[expert]) @ w_out[expert])
        start += n
    return torch.stack(out) if out else rows @ w_in[0] @ w_out[0]  # [0, D], on the graph


FEED_FORWARD_PATHS = {
    "per_expert": lambda r, a, b, c, ws: _PerExpertFeedForward.apply(r, a, b, c, ws),
    "padded": lambda r, a, b, c, ws: _padded_feed_forward(r, a, b, torch.tensor(c)),
}


@pytest.mark.parametrize("case", list(COUNTS))
@pytest.mark.parametrize("path", list(FEED_FORWARD_PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_cpu_feed_forward_paths_equal_a_loop_over_experts(case, path, dtype, monkeypatch):
    """The CPU's fused expert (both products and the ReLU per expert, in-place ReLU
    derivative, reused storage) and its padded bmm for tiny products: outputs and all three
    gradients, twice in a row on the same workspace (the second call runs on the first one's
    storage)."""
    counts = COUNTS[case]
    generator = torch.Generator().manual_seed(len(counts))
    rows = torch.randn(sum(counts), D, dtype=dtype, generator=generator, requires_grad=True)
    w_in = torch.randn(len(counts), D, H, dtype=dtype, generator=generator, requires_grad=True)
    w_out = torch.randn(len(counts), H, D, dtype=dtype, generator=generator, requires_grad=True)
    grad_out = torch.randn(sum(counts), D, dtype=dtype, generator=generator)
    params = (rows, w_in, w_out)
    monkeypatch.setattr("lstm_moe.moe.workspace.MIN_REUSED_BYTES", 0)  # reuse at any size
    want = ffn_reference(rows, w_in, w_out, counts)
    want_grads = torch.autograd.grad(want, params, grad_out, allow_unused=True)
    workspace = Workspace()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for _ in range(2):
        got = FEED_FORWARD_PATHS[path](rows, w_in, w_out, counts, workspace)
        got_grads = torch.autograd.grad(got, params, grad_out)
        torch.testing.assert_close(got, want, **tol)
        for got_grad, want_grad, tensor in zip(got_grads, want_grads, params, strict=True):
            want_grad = torch.zeros_like(tensor) if want_grad is None else want_grad
            torch.testing.assert_close(got_grad, want_grad, **tol)
        for expert, n in enumerate(counts):
            if n == 0:  # exactly zero, never stale memory from the previous call
                assert not got_grads[1][expert].any() and not got_grads[2][expert].any()


def test_the_fused_cpu_feed_forward_passes_gradcheck():
    counts = [2, 0, 3, 1]
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(6, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    w_in = torch.randn(4, 3, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    w_out = torch.randn(4, 5, 2, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda r, a, b: _PerExpertFeedForward.apply(r, a, b, counts, Workspace()),
        (rows, w_in, w_out),
    )


def test_expert_feed_forward_takes_the_fused_path_on_the_cpu_except_for_small_products(
    monkeypatch,
):
    rows = torch.randn(4, D, requires_grad=True)
    w_in, w_out = torch.randn(2, D, H), torch.randn(2, H, D)
    out = expert_feed_forward(rows, w_in, w_out, torch.tensor([1, 3]))
    assert type(out.grad_fn).__name__ == "IndexSelectBackward0"  # tiny: the padded bmm
    monkeypatch.setattr("lstm_moe.moe.experts._PADDED_MAX_MACS_PER_EXPERT", 0)
    out = expert_feed_forward(rows, w_in, w_out, torch.tensor([1, 3]))
    assert type(out.grad_fn).__name__ == "_PerExpertFeedForwardBackward"
    out = expert_feed_forward(rows, w_in, w_out, torch.tensor([2, 2]))
    assert type(out.grad_fn).__name__ == "ViewBackward0"  # equal counts: one bmm each
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the products run in bf16 instead
        out = expert_feed_forward(rows, w_in, w_out, torch.tensor([1, 3]))
    assert out.dtype == torch.bfloat16
