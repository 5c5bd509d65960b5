"""The Switch router: its formulas on hand-computed cases, the layer built on it against a
token-by-token reference (top-1 and top-2, dropless and with capacity, with input jitter),
gradients in float64, selective precision and the reduced initialisation."""

from __future__ import annotations

import math

import pytest
import torch

from lstm_moe.moe import MoELayer, plan_dispatch
from switch import SwitchRouter, load_balancing_loss
from switch.router import TRUNCATED_STD
from tests.moe import reference
from tests.moe.test_layer_vs_reference import fast, run

D, H, E = 12, 16, 6


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def test_load_balancing_loss_hand_computed():
    # N · Σ f_i P_i = 4 · (0.5·0.4 + 0.25·0.3 + 0.25·0.2 + 0·0.1) = 4 · 0.325
    f = torch.tensor([0.5, 0.25, 0.25, 0.0])
    p = torch.tensor([0.4, 0.3, 0.2, 0.1])
    assert load_balancing_loss(f, p).item() == pytest.approx(1.3)
    uniform = torch.full((4,), 0.25)
    assert load_balancing_loss(uniform, uniform).item() == pytest.approx(1.0)
    collapsed = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert load_balancing_loss(collapsed, collapsed).item() == pytest.approx(4.0)


def identity_router(k: int, **options) -> SwitchRouter:
    """Two experts whose logits are the input itself."""
    router = SwitchRouter(2, 2, k, **options).eval()
    with torch.no_grad():
        router.w_router.copy_(torch.eye(2))
    return router


# Logits [ln 3, 0] give p = [3/4, 1/4]; the three tokens pick experts 0, 1, 0.
LOGITS = torch.tensor([[math.log(3.0), 0.0], [0.0, math.log(3.0)], [math.log(3.0), 0.0]])


def test_top1_routing_and_losses_hand_computed():
    routing = identity_router(1, w_balance=0.01, w_z=0.001)(LOGITS)
    assert routing.expert_index.tolist() == [[0], [1], [0]]
    torch.testing.assert_close(routing.gates, torch.full((3, 1), 0.75))  # p_i(x), not 1
    # f = [2/3, 1/3]; P = [(3/4 + 1/4 + 3/4)/3, (1/4 + 3/4 + 1/4)/3] = [7/12, 5/12]
    balance = 2 * (2 / 3 * 7 / 12 + 1 / 3 * 5 / 12)
    z = math.log(4.0) ** 2  # logsumexp([ln 3, 0]) = ln 4 for every token
    assert routing.losses["balance"].item() == pytest.approx(balance)
    assert routing.losses["z"].item() == pytest.approx(z)
    assert routing.aux_loss.item() == pytest.approx(0.01 * balance + 0.001 * z)
    assert routing.load.tolist() == [2.0, 1.0]
    torch.testing.assert_close(routing.importance, torch.tensor([1.5, 0.75]))
    assert routing.slot_priority


def test_top2_gates_are_renormalised_and_balance_counts_both_choices():
    routing = identity_router(2)(LOGITS)
    assert routing.expert_index.tolist() == [[0, 1], [1, 0], [0, 1]]
    torch.testing.assert_close(routing.gates.sum(-1), torch.ones(3))
    torch.testing.assert_close(routing.gates[:, 0], torch.full((3,), 0.75))
    # Every token reaches both experts: f = [1/2, 1/2], so N · Σ f P = 2 · 1/2 · Σ P = 1.
    assert routing.losses["balance"].item() == pytest.approx(1.0)


@pytest.mark.parametrize(("renormalize", "gates"), [(True, [0.6, 0.4]), (False, [0.5, 1 / 3])])
def test_top2_gates_with_and_without_renormalising(renormalize, gates):
    router = SwitchRouter(3, 3, 2, renormalize=renormalize).eval()
    with torch.no_grad():
        router.w_router.copy_(torch.eye(3))
    # p = [3/6, 2/6, 1/6]: the top two are 1/2 and 1/3, or 3/5 and 2/5 renormalised.
    routing = router(torch.tensor([[math.log(3.0), math.log(2.0), 0.0]]))
    assert routing.expert_index.tolist() == [[0, 1]]
    torch.testing.assert_close(routing.gates, torch.tensor([gates]))


def test_slot_priority_gives_capacity_to_first_choices_first():
    # Expert 0 is the first choice of tokens 0 and 2 and the second choice of tokens 1 and 2;
    # with room for two rows, slot priority keeps both first choices.
    expert_index = torch.tensor([[0, 1], [1, 0], [0, 0]])
    by_slot = plan_dispatch(expert_index, 2, 2, slot_priority=True)
    by_token = plan_dispatch(expert_index, 2, 2)
    kept = lambda plan: sorted(divmod(int(p), 2) for p in plan.pair_index)  # noqa: E731
    assert kept(by_slot) == [(0, 0), (0, 1), (1, 0), (2, 0)]
    assert kept(by_token) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    # Dropless, the order does not matter: the same pairs are kept.
    assert kept(plan_dispatch(expert_index, 2, None, True)) == kept(plan_dispatch(expert_index, 2))


def make_switch_layer(k: int, capacity_factor, dtype=torch.float32, **options) -> MoELayer:
    router = SwitchRouter(D, E, k, w_z=1e-3, **options)
    with torch.no_grad():  # larger weights than the reduced init, so routing varies by token
        router.w_router.normal_(0.0, 0.5)
    layer = MoELayer(D, E, H, k, router=router, capacity_factor=capacity_factor)
    return layer.to(dtype)


def switch_reference(layer: MoELayer, x: torch.Tensor):
    """Token by token, Switch Eq. 1-6 and the ST-MoE z-loss. The jitter is drawn as one
    uniform [T, D] tensor, as the router draws it, and reaches only the router's input."""
    router, cfg = layer.router, layer.config
    n_tokens, k = x.shape[0], router.k
    router_input = x
    if router.training and router.jitter_eps > 0:
        u = torch.rand(x.shape, dtype=x.dtype)
        router_input = x * (1 - router.jitter_eps + 2 * router.jitter_eps * u)
    choices, gates, probs, lse = [], [], [], []
    for t in range(n_tokens):
        logits = router_input[t] @ router.w_router.to(x.dtype)
        p = torch.softmax(logits, 0)
        order = [int(i) for i in torch.sort(p, descending=True, stable=True).indices[:k]]
        g = torch.stack([p[i] for i in order])
        choices.append(order)
        gates.append(g if k == 1 else g / g.sum())
        probs.append(p)
        lse.append(torch.log(torch.exp(logits).sum()))
    f = [sum(c.count(i) for c in choices) / (n_tokens * k) for i in range(E)]
    mean_prob = torch.stack(probs).mean(0)
    balance = E * sum(f[i] * mean_prob[i] for i in range(E))
    z = sum(v**2 for v in lse) / n_tokens
    capacity = None
    if cfg.capacity_factor is not None:
        capacity = math.ceil(cfg.capacity_factor * n_tokens * k / E)
    taken = [0] * E
    out = [x.new_zeros(D) for _ in range(n_tokens)]
    for slot in range(k):  # every first choice before any second choice
        for t in range(n_tokens):
            e = choices[t][slot]
            if capacity is not None and taken[e] >= capacity:
                continue
            taken[e] += 1
            out[t] = out[t] + gates[t][slot] * reference.expert_forward(layer.experts, e, x[t])
    aux = router.w_balance * balance + router.w_z * z
    return torch.stack(out), aux, {"balance": balance, "z": z}


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("capacity_factor", [None, 0.75])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("cpu_paths", ["small", "large"])
def test_switch_layer_matches_reference(k, capacity_factor, training, cpu_paths, monkeypatch):
    if cpu_paths == "large":  # at this size the padded bmm and by-slot combine are taken
        monkeypatch.setattr("lstm_moe.moe.experts._PADDED_MAX_MACS_PER_EXPERT", 0)
        monkeypatch.setattr("lstm_moe.moe.dispatch._COMBINE_BLOCK_ELEMENTS", 20)
    # A large jitter, so that it changes some routes and a wrong draw would show.
    layer = make_switch_layer(k, capacity_factor, jitter_eps=0.5).train(training)
    x = torch.randn(16, D)
    got = run(fast, layer, x, seed=3)
    want = run(switch_reference, layer, x, seed=3)
    tol = dict(atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got[0], want[0], **tol)
    torch.testing.assert_close(got[1], want[1], **tol)
    for name in ("balance", "z"):
        torch.testing.assert_close(got[2][name], want[2][name], **tol, msg=name)
    torch.testing.assert_close(got[3], want[3], **tol)
    for name, grad in want[4].items():
        torch.testing.assert_close(got[4][name], grad, **tol, msg=name)
    if capacity_factor is not None:
        assert layer(x).stats.fraction_dropped > 0  # the case exercises dropping


def test_jitter_changes_routing_only_in_training():
    layer = make_switch_layer(1, None, jitter_eps=0.9)
    x = torch.randn(64, D)
    layer.eval()
    assert torch.equal(layer.router(x).expert_index, layer.router(x).expert_index)
    layer.train()
    torch.manual_seed(0)
    first = layer.router(x).expert_index
    second = layer.router(x).expert_index
    assert not torch.equal(first, second)


@pytest.mark.parametrize("k", [1, 2])
def test_gradcheck_float64(k):
    """Output and auxiliary loss against the input and W_r (the balance loss through P_i, the
    z-loss, and the gates)."""
    layer = make_switch_layer(k, None, torch.float64).eval()
    layer.router.w_z = 1e-2
    x = torch.randn(7, D, dtype=torch.float64, requires_grad=True)
    w = layer.router.w_router.detach().clone().requires_grad_(True)

    def output_and_aux(x, w):
        result = torch.func.functional_call(layer, {"router.w_router": w}, (x,))
        return result.output, result.aux_loss

    assert torch.autograd.gradcheck(output_and_aux, (x, w), eps=1e-6, atol=1e-6)


def test_router_runs_in_float32_under_bf16_autocast():
    layer = make_switch_layer(1, 1.0).eval()
    x = torch.randn(10, D).to(torch.bfloat16)
    want = layer.router(x.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer.router(x)
        result = layer(x.float())
    assert got.gates.dtype == torch.float32
    torch.testing.assert_close(got.gates, want.gates)
    assert torch.equal(got.expert_index, want.expert_index)
    assert result.aux_loss.dtype == torch.float32


def test_reduced_initialisation():
    d_model = 512
    router = SwitchRouter(d_model, 64)
    std = math.sqrt(0.1 / d_model)  # the standard deviation after truncation
    w = router.w_router.detach()
    # Cut at two standard deviations of the normal it was drawn from, σ = std / 0.8796.
    assert w.abs().max() <= 2 * std / 0.8796
    assert w.abs().max() > 2 * std  # ... which lies beyond 2·std
    assert w.std().item() == pytest.approx(std, rel=0.03)


def test_truncated_std_constant():
    z = torch.tensor(2.0, dtype=torch.float64)
    density = torch.exp(-(z**2) / 2) / math.sqrt(2 * math.pi)
    mass = torch.special.ndtr(z) - torch.special.ndtr(-z)
    assert torch.sqrt(1 - 2 * z * density / mass).item() == pytest.approx(TRUNCATED_STD, 1e-12)


def test_layer_rejects_a_router_with_other_k_or_experts():
    with pytest.raises(ValueError, match="experts_per_token"):
        MoELayer(D, E, H, 2, router=SwitchRouter(D, E, 1))
    with pytest.raises(ValueError, match="n_experts"):
        MoELayer(D, E, H, 1, router=SwitchRouter(D, E + 2, 1))
    with pytest.raises(ValueError, match="jitter_eps"):
        SwitchRouter(D, E, jitter_eps=1.0)


def test_uniform_router_gives_balance_one():
    router = SwitchRouter(D, E)
    with torch.no_grad():
        router.w_router.zero_()
    routing = router.eval()(torch.randn(30, D))
    # p uniform: P_i = 1/E whatever f is, so N · Σ f_i / E = 1; z = (log E)².
    assert routing.losses["balance"].item() == pytest.approx(1.0)
    assert routing.losses["z"].item() == pytest.approx(math.log(E) ** 2)
