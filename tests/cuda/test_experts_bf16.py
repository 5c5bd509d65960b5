"""The experts in bf16 on CUDA against float32 on the same routing: the grouped product
(torch._grouped_mm on sm90 and newer, the padded bmm where it is missing) and the MoE layer's
whole expert path (dispatch, experts, combine), outputs and gradients, to bf16's precision; a
float32 router gives the same routing under bf16 autocast as without it."""

from __future__ import annotations

import pytest
import torch

from lstm_moe.moe import MoELayer
from lstm_moe.moe.experts import grouped_matmul
from tests.cuda.device import CUDA, has_grouped_kernel, needs_cuda
from tests.moe.test_grouped_matmul import reference

pytestmark = needs_cuda

D, H = 64, 128  # bf16 rows of 128 and 256 bytes: the grouped kernel's 16-byte alignment holds
COUNTS = {
    "balanced": [32] * 8,
    "empty experts": [0, 70, 0, 3, 41, 0, 130, 12],
    "one expert": [0, 0, 200, 0],
}
# bf16 keeps 8 significant bits: each operand rounded to it is off by up to 2^-9 relative, so
# a product over D terms is off by about that in norm, and the output's own rounding adds as
# much again. 1e-2 leaves room for both, while a row sent to the wrong expert, or a block
# left unwritten, is off by order 1.
BF16_REL = 1e-2
# Gradients that pass back through a ReLU's derivative are further off: a hidden unit within
# bf16's rounding of zero lands on either side of it, and its gradient then passes or not.
# A fraction p of such units gives a relative error of about sqrt(p): 4% measured here (the
# smooth GEGLU: 0.5%), still far below a misrouted row's order 1.
BF16_REL_THROUGH_RELU = 0.1
THROUGH_RELU = ("w_in", "b_in", "tokens")


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got - want‖ / ‖want‖, in float32."""
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).norm() / want.norm().clamp(min=1e-12))


def product_and_grads(rows, weight, counts, grad_out, autocast: bool):
    """grouped_matmul(rows, weight) [N, H] and the gradients of rows and weight (float32
    leaves either way; under autocast the product runs in bf16)."""
    rows = rows.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
        out = grouped_matmul(rows, weight, torch.tensor(counts, device=CUDA))
    out.backward(grad_out.to(out.dtype))
    return out, rows.grad, weight.grad


@pytest.fixture(params=["grouped kernel", "padded bmm"])
def bf16_path(request, monkeypatch):
    """The two bf16 products CUDA can take: the kernel, and the fallback of a torch without
    it (the kernel removed)."""
    if request.param == "grouped kernel" and not has_grouped_kernel():
        pytest.skip("torch._grouped_mm needs sm90 or newer and torch >= 2.8")
    if request.param == "padded bmm" and hasattr(torch, "_grouped_mm"):
        monkeypatch.delattr(torch, "_grouped_mm")
    return request.param


@pytest.mark.parametrize("case", list(COUNTS))
def test_the_bf16_grouped_product_is_the_float32_one(case, bf16_path):
    counts = COUNTS[case]
    generator = torch.Generator(CUDA).manual_seed(len(counts))
    rows = torch.randn(sum(counts), D, device=CUDA, generator=generator)
    weight = torch.randn(len(counts), D, H, device=CUDA, generator=generator) * D**-0.5
    grad_out = torch.randn(sum(counts), H, device=CUDA, generator=generator)

    leaf_rows, leaf_weight = rows.clone().requires_grad_(), weight.clone().requires_grad_()
    want = reference(leaf_rows, leaf_weight, counts)  # row by row, in float32
    want.backward(grad_out)
    got, got_rows, got_weight = product_and_grads(rows, weight, counts, grad_out, autocast=True)

    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert relative_error(got, want) < BF16_REL
    assert relative_error(got_rows, leaf_rows.grad) < BF16_REL
    assert relative_error(got_weight, leaf_weight.grad) < BF16_REL
    empty = torch.tensor(counts, device=CUDA) == 0
    assert (got_weight[empty] == 0).all()  # an expert with no rows has a zero gradient


def test_the_bf16_product_takes_the_grouped_kernel_on_sm90(monkeypatch):
    """One kernel call forward and two backward (rows' and weight's gradients): the grouped
    kernel, not the padded fallback."""
    if not has_grouped_kernel():
        pytest.skip("torch._grouped_mm needs sm90 or newer and torch >= 2.8")
    calls = []
    kernel = torch._grouped_mm

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", counted)
    counts = COUNTS["empty experts"]
    rows = torch.randn(sum(counts), D, device=CUDA)
    weight = torch.randn(len(counts), D, H, device=CUDA)
    grad_out = torch.randn(sum(counts), H, device=CUDA)
    product_and_grads(rows, weight, counts, grad_out, autocast=True)
    assert len(calls) == 3


# The layer's options whose expert paths differ: the 2017 expert (fused on the CPU, two
# grouped products here), biases, GEGLU's third tensor; a capacity that drops pairs.
LAYERS = {
    "noisy_topk": dict(k=2),
    "biases": dict(k=2, expert_bias=True),
    "geglu": dict(k=2, expert_activation="geglu"),
    "switch, capacity 1.25": dict(k=1, router="switch", capacity_factor=1.25),
}
T, E = 512, 8


@pytest.mark.parametrize("layer_name", list(LAYERS))
def test_the_layers_expert_path_in_bf16_is_the_float32_one(layer_name, bf16_path):
    """mix_experts (dispatch, experts, combine) on one fixed routing, with and without bf16
    autocast: the same rows per expert, and output and gradients (tokens, gates, every expert
    tensor) equal to bf16's precision."""
    torch.manual_seed(0)
    options = LAYERS[layer_name]
    layer = MoELayer(D, E, H, **options).to(CUDA)
    k = options["k"]
    generator = torch.Generator(CUDA).manual_seed(1)
    tokens = torch.randn(T, D, device=CUDA, generator=generator)
    # Skewed towards the last experts, so that a capacity drops pairs.
    scores = torch.rand(T, E, device=CUDA, generator=generator) + torch.linspace(
        0, 1, E, device=CUDA
    )
    expert_index = scores.topk(k, dim=-1).indices  # [T, K] distinct experts per token
    gates = torch.softmax(torch.randn(T, k, device=CUDA, generator=generator), -1)  # [T, K]
    grad_out = torch.randn(T, D, device=CUDA, generator=generator)
    slot_priority = options.get("router") == "switch"

    results = {}
    for autocast in (False, True):
        layer.zero_grad(set_to_none=True)
        leaf_tokens, leaf_gates = tokens.clone().requires_grad_(), gates.clone().requires_grad_()
        with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            out, dispatch = layer.mix_experts(leaf_tokens, expert_index, leaf_gates, slot_priority)
        out.backward(grad_out)
        grads = {name: p.grad.clone() for name, p in layer.experts.named_parameters()}
        grads.update(tokens=leaf_tokens.grad, gates=leaf_gates.grad)
        results[autocast] = (out.detach(), dispatch.rows_per_expert.clone(), grads)

    (want, want_rows, want_grads), (got, got_rows, got_grads) = results[False], results[True]
    torch.testing.assert_close(got_rows, want_rows, rtol=0, atol=0)
    if layer_name.startswith("switch"):
        assert int(want_rows.sum()) < T  # the capacity dropped pairs: checked too
    assert relative_error(got, want) < BF16_REL
    assert set(got_grads) == set(want_grads)
    relu = options.get("expert_activation", "relu") == "relu"
    for name, want_grad in want_grads.items():
        tolerance = BF16_REL_THROUGH_RELU if relu and name in THROUGH_RELU else BF16_REL
        assert relative_error(got_grads[name], want_grad) < tolerance, name


def test_a_float32_router_routes_alike_with_and_without_bf16_autocast():
    """The whole layer in evaluation (no noise): the router's float32 math gives the same
    experts, tokens per expert and gates under autocast, and the output agrees to bf16's
    precision."""
    torch.manual_seed(0)
    layer = MoELayer(D, E, H, k=2).to(CUDA).eval()
    with torch.no_grad():
        layer.router.w_gate.normal_()  # W_g starts at zero: every expert tied
    x = torch.randn(4, T // 4, D, device=CUDA)
    with torch.no_grad():
        want = layer(x)
        with torch.autocast("cuda", torch.bfloat16):
            got = layer(x)
    torch.testing.assert_close(
        got.stats.tokens_per_expert, want.stats.tokens_per_expert, rtol=0, atol=0
    )
    torch.testing.assert_close(got.stats.importance, want.stats.importance, rtol=0, atol=0)
    assert relative_error(got.output, want.output) < BF16_REL
