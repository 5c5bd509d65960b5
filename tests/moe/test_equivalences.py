"""Structural equivalences: one expert is a dense FFN, one group is the flat MoE, dropless is
unlimited capacity, the convolutional application equals step by step, the fast grouped
matmul equals a loop; sparsity and evaluation determinism."""

import pytest
import torch
from torch import nn

from lstm_moe.moe import MoELayer, grouped_matmul
from lstm_moe.moe.experts import _padded_bmm


def test_one_expert_k1_equals_dense_ffn():
    layer = MoELayer(8, 1, 16, 1, expert_bias=True).train()
    dense = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    with torch.no_grad():
        dense[0].weight.copy_(layer.experts.w_in[0].t())
        dense[0].bias.copy_(layer.experts.b_in[0])
        dense[2].weight.copy_(layer.experts.w_out[0].t())
        dense[2].bias.copy_(layer.experts.b_out[0])
    x = torch.randn(3, 5, 8, requires_grad=True)
    x_dense = x.detach().clone().requires_grad_()
    out = layer(x)
    want = dense(x_dense)
    torch.testing.assert_close(out.output, want)
    assert out.aux_loss.item() == 0.0
    g = torch.randn_like(want)
    out.output.backward(g)
    want.backward(g)
    torch.testing.assert_close(x.grad, x_dense.grad)
    torch.testing.assert_close(layer.experts.w_in.grad[0], dense[0].weight.grad.t())
    torch.testing.assert_close(layer.experts.w_out.grad[0], dense[2].weight.grad.t())
    torch.testing.assert_close(layer.experts.b_in.grad[0], dense[0].bias.grad)


@pytest.mark.parametrize("training", [True, False])
def test_hierarchical_with_one_group_equals_flat(training):
    flat = MoELayer(8, 6, 16, 2).train(training)
    hier = MoELayer(8, 6, 16, 2, "hierarchical", n_groups=1, k_groups=1).train(training)
    with torch.no_grad():
        flat.router.w_gate.normal_()
        flat.router.w_noise.normal_()
        hier.router.w_gate.copy_(flat.router.w_gate.unsqueeze(0))
        hier.router.w_noise.copy_(flat.router.w_noise.unsqueeze(0))
        hier.experts.load_state_dict(flat.experts.state_dict())
    x = torch.randn(20, 8)
    torch.manual_seed(5)
    a = flat(x)
    torch.manual_seed(5)
    b = hier(x)
    torch.testing.assert_close(a.output, b.output)
    for name in ("importance", "load"):
        torch.testing.assert_close(a.losses[name], b.losses[name])
    torch.testing.assert_close(a.aux_loss, b.aux_loss)


def test_dropless_equals_unlimited_capacity():
    dropless = MoELayer(8, 4, 16, 2).eval()
    capped = MoELayer(8, 4, 16, 2, capacity_factor=4.0).eval()  # capacity = all tokens
    capped.load_state_dict(dropless.state_dict())
    with torch.no_grad():
        dropless.router.w_gate.normal_()
        capped.router.w_gate.copy_(dropless.router.w_gate)
    x = torch.randn(30, 8)
    a, b = dropless(x), capped(x)
    torch.testing.assert_close(a.output, b.output)
    assert b.stats.fraction_dropped.item() == 0.0


def test_convolutional_application_equals_step_by_step():
    """The MoE on [time, batch, D] in one call equals calling it on each time step
    (evaluation: no noise, and the paper's losses are per batch, so compare outputs)."""
    layer = MoELayer(8, 8, 16, 2).eval()
    with torch.no_grad():
        layer.router.w_gate.normal_()
    x = torch.randn(6, 3, 8)
    whole = layer(x).output
    steps = torch.stack([layer(x[t]).output for t in range(x.shape[0])])
    torch.testing.assert_close(whole, steps)


@pytest.mark.parametrize("counts", [[5, 0, 3, 8], [0, 0, 0, 4], [16, 0, 0, 0]])
def test_grouped_matmul_equals_loop_over_experts(counts):
    counts = torch.tensor(counts)
    rows = torch.randn(int(counts.sum()), 8, requires_grad=True)
    weight = torch.randn(4, 8, 4, requires_grad=True)
    got = grouped_matmul(rows, weight, counts)
    want = torch.cat([r @ w for r, w in zip(rows.split(counts.tolist()), weight, strict=True)])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(_padded_bmm(rows, weight, counts), want)
    g = torch.randn_like(want)
    grads = torch.autograd.grad(got, (rows, weight), g)
    want_grads = torch.autograd.grad(want, (rows, weight), g)
    for a, b in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a, b)


class RecordingExperts(nn.Module):
    """Wraps the experts and records which input rows each expert received."""

    def __init__(self, experts):
        super().__init__()
        self.inner = experts
        self.received = None

    def forward(self, rows, rows_per_expert):
        self.received = list(rows.detach().split(rows_per_expert.tolist()))
        return self.inner(rows, rows_per_expert)


@pytest.mark.parametrize(
    "router,options", [("noisy_topk", {}), ("hierarchical", {"n_groups": 2}), ("batchwise", {})]
)
def test_an_expert_only_sees_tokens_routed_to_it(router, options):
    layer = MoELayer(8, 8, 16, 2, router, **options).train()
    layer.experts = RecordingExperts(layer.experts)
    x = torch.arange(24 * 8, dtype=torch.float32).view(24, 8) / 100  # distinct rows
    torch.manual_seed(0)
    routing = layer.router(x)
    torch.manual_seed(0)
    layer(x)
    for e, rows in enumerate(layer.experts.received):
        routed_tokens = (routing.expert_index == e).any(-1).nonzero().squeeze(-1)
        torch.testing.assert_close(rows, x[routed_tokens])


def test_eval_is_deterministic_and_draws_no_noise():
    layer = MoELayer(8, 8, 16, 2).eval()
    with torch.no_grad():
        layer.router.w_noise.normal_(0, 5.0)  # large noise scale: any draw would show
    x = torch.randn(10, 8)
    state = torch.get_rng_state()
    a = layer(x)
    assert torch.equal(state, torch.get_rng_state())
    b = layer(x)
    torch.testing.assert_close(a.output, b.output, rtol=0, atol=0)
    # Evaluation routing is the top k of the clean logits x·W_g.
    clean_top = (x @ layer.router.w_gate).topk(2, dim=-1).indices
    torch.testing.assert_close(layer.router(x).expert_index, clean_top)


def test_training_draws_noise():
    layer = MoELayer(8, 8, 16, 2).train()
    x = torch.randn(64, 8)
    a, b = layer(x), layer(x)
    assert not torch.equal(a.output, b.output)


def test_batchwise_training_gives_every_expert_exactly_m_tokens():
    layer = MoELayer(8, 4, 16, 2, "batchwise").train()
    out = layer(torch.randn(10, 8))
    m = 2 * 10 // 4
    assert out.stats.tokens_per_expert.tolist() == [m] * 4
    assert out.losses["load"].item() == 0.0


def test_batchwise_thresholds_learn_the_batchwise_mask():
    """Minimising Eq. 20 alone moves T until the threshold mask agrees with the batchwise mask
    on the training batch."""
    torch.manual_seed(0)
    layer = MoELayer(8, 4, 16, 1, "batchwise").train()
    x = torch.randn(256, 8)
    opt = torch.optim.SGD([layer.router.thresholds], lr=0.01)
    first = layer(x).losses["threshold"].item()
    for _ in range(300):
        opt.zero_grad()
        layer(x).losses["threshold"].backward()
        opt.step()
    last = layer(x).losses["threshold"].item()
    assert last < 0.1 * first
    layer.eval()
    routed_eval = layer(x).stats.tokens_per_expert.float()
    assert (routed_eval - 256 / 4).abs().max() <= 256 / 4 * 0.2
