"""The fast layer equals the token-by-token reference: outputs, losses and gradients, for every
2017 router, dropless and with capacity, in training (noisy) and evaluation mode, in float32
and float64, with experts that receive no rows, on both CPU expert paths (the Switch router's
own reference is in tests/switch)."""

import pytest
import torch

from lstm_moe.moe import MoELayer, plan_dispatch

from . import reference

D, H = 12, 16  # rows of 48 and 64 bytes (aligned as the grouped kernel needs, where it runs)

CASES = {
    "noisy_topk": dict(n_experts=8, k=3, router="noisy_topk"),
    "noisy_topk_k_equals_e": dict(n_experts=3, k=3, router="noisy_topk"),
    # Two cases with expert biases so the bias path is checked too (off by default).
    "hierarchical": dict(
        n_experts=12, k=2, router="hierarchical", n_groups=3, k_groups=2, expert_bias=True
    ),
    "batchwise": dict(n_experts=6, k=2, router="batchwise", expert_bias=True),
    # More experts than pairs: some experts receive no rows.
    "noisy_topk_idle_experts": dict(n_experts=32, k=2, router="noisy_topk"),
}


def make_layer(case: str, capacity_factor, dtype) -> MoELayer:
    options = dict(CASES[case])
    layer = MoELayer(
        D,
        options.pop("n_experts"),
        H,
        options.pop("k"),
        options.pop("router"),
        capacity_factor=capacity_factor,
        **options,
    )
    # Non-zero gating weights so that routing depends on the input.
    with torch.no_grad():
        for name, p in layer.router.named_parameters():
            if name != "thresholds":
                p.normal_(0.0, 0.5)
    return layer.to(dtype)


def run(fn, layer, x, seed):
    """Forward with a fixed seed, backward of a random projection of the output plus aux."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    out, aux, losses = fn(layer, x)
    projection = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    ((out * projection).sum() + aux).backward()
    grads = {name: p.grad for name, p in layer.named_parameters()}
    return out.detach(), aux.detach(), {k: v.detach() for k, v in losses.items()}, x.grad, grads


def fast(layer, x):
    result = layer(x)
    return result.output, result.aux_loss, result.losses


def slow(layer, x):
    return reference.moe_forward(layer, x)


@pytest.mark.usefixtures("cpu_expert_path")
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("capacity_factor", [None, 0.75])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_matches_reference(case, capacity_factor, training, dtype):
    layer = make_layer(case, capacity_factor, dtype)
    layer.train(training)
    x = torch.randn(9, D, dtype=dtype)
    reference.NOISE_DTYPE[0] = dtype
    got = run(fast, layer, x, seed=7)
    want = run(slow, layer, x, seed=7)
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(got[0], want[0], **tol)
    torch.testing.assert_close(got[1], want[1], **tol)
    assert got[2].keys() == want[2].keys()
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], **tol, msg=name)
    torch.testing.assert_close(got[3], want[3], **tol)
    for name, grad in want[4].items():
        if grad is None:
            assert got[4][name] is None or got[4][name].abs().max() == 0, name
        else:
            torch.testing.assert_close(got[4][name], grad, **tol, msg=name)


def test_capacity_drops_in_token_order():
    layer = make_layer("noisy_topk", 0.5, torch.float32).eval()
    x = torch.randn(40, D)
    stats = layer(x).stats
    capacity = 8  # ceil(0.5 · 40 tokens · 3 slots / 8 experts) = ceil(7.5)
    assert int(stats.tokens_per_expert.max()) <= capacity
    assert stats.fraction_dropped > 0
    # Which pairs were kept: for every expert, the first `capacity` tokens routed to it.
    routing = layer.router(x)
    plan = plan_dispatch(routing.expert_index, 8, capacity)
    kept = {(int(p) // 3, int(routing.expert_index.view(-1)[p])) for p in plan.pair_index}
    for expert in range(8):
        routed = [t for t in range(40) if expert in routing.expert_index[t].tolist()]
        assert sorted(t for t, e in kept if e == expert) == routed[:capacity], expert
