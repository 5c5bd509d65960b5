"""Edge cases: empty batches, one token, everything dropped, and mixed precision."""

import pytest
import torch

from lstm_moe.moe import MoELayer

ROUTERS = [("noisy_topk", {}), ("hierarchical", {"n_groups": 2}), ("batchwise", {})]


@pytest.mark.parametrize("router,options", ROUTERS)
@pytest.mark.parametrize("training", [True, False])
def test_empty_batch(router, options, training):
    layer = MoELayer(8, 4, 16, 2, router, **options).train(training)
    x = torch.randn(0, 3, 8, requires_grad=True)
    out = layer(x)
    assert out.output.shape == (0, 3, 8)
    (out.output.sum() + out.aux_loss).backward()
    assert torch.isfinite(out.aux_loss)


@pytest.mark.parametrize("router,options", ROUTERS)
def test_single_token(router, options):
    layer = MoELayer(8, 4, 16, 2, router, **options).train()
    out = layer(torch.randn(1, 8))
    assert out.output.shape == (1, 8) and torch.isfinite(out.output).all()


def test_tiny_capacity_drops_but_stays_finite():
    layer = MoELayer(8, 4, 16, 4, capacity_factor=0.01).train()  # capacity 1 per expert
    out = layer(torch.randn(50, 8))
    assert out.stats.tokens_per_expert.tolist() == [1, 1, 1, 1]
    assert out.stats.fraction_dropped.item() == pytest.approx(1 - 4 / 200)
    assert torch.isfinite(out.output).all()


def test_bf16_autocast_keeps_router_and_mix_in_float32():
    """Experts run in bf16 under autocast; the gate (Switch's selective precision) and the
    gate-weighted mix stay float32."""
    layer = MoELayer(16, 4, 16, 2).train()
    x = torch.randn(12, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = layer.router(x)
        out = layer(x)
    assert routing.gates.dtype == torch.float32 and routing.aux_loss.dtype == torch.float32
    assert out.output.dtype == torch.float32
    reference = layer.eval()(x).output
    layer.train()
    assert torch.isfinite(out.output).all()
    # bf16 experts: close to the float32 result at bf16 precision, but not equal to it (the
    # expert products did run in bf16).
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = layer.eval()(x).output
    torch.testing.assert_close(low, reference, atol=5e-2, rtol=5e-2)
    assert not torch.equal(low, reference)


def test_batchwise_gate_of_a_nearly_dead_expert_renormalises_to_one():
    """In evaluation, a token whose only expert above its threshold has a gate value of ~1e-40
    (a float32 subnormal) gets gate 1 from that expert (Eq. 16), not p / (a tiny floor)."""
    from lstm_moe.moe import BatchwiseRouter

    router = BatchwiseRouter(2, 2, 1).eval()
    with torch.no_grad():
        router.w_gate.copy_(torch.tensor([[0.0, -90.0], [0.0, 0.0]]))
        router.thresholds.copy_(torch.tensor([2.0, 0.0]))  # expert 0 never, expert 1 always
    routing = router(torch.tensor([[1.0, 0.0]]))  # G_σ = [1, e^-90]
    assert routing.expert_index.tolist() == [[1]]
    torch.testing.assert_close(routing.gates, torch.ones(1, 1))


def test_a_dropless_call_ignores_the_capacity():
    """forward(dropless=True) keeps every pair a capacity would drop, and equals the layer
    built dropless with the same weights."""
    torch.manual_seed(0)
    capped = MoELayer(8, 4, 16, 1, "switch", capacity_factor=0.25).eval()
    free = MoELayer(8, 4, 16, 1, "switch").eval()
    free.load_state_dict(capped.state_dict())
    x = torch.randn(12, 8)
    assert float(capped(x).stats.fraction_dropped) > 0
    got, want = capped(x, dropless=True), free(x)
    assert float(got.stats.fraction_dropped) == 0
    torch.testing.assert_close(got.output, want.output, rtol=0, atol=0)
