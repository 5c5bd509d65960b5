"""Expert-choice routing (Zhou et al. 2022): each expert takes exactly its capacity of the
batch's tokens, the layer equals a slow per-expert reference (outputs and gradients), padding
is never chosen, the expert-major choice goes through the one dispatcher, and causal models
refuse it unless asked. Expert parallelism over the global batch is in test_parallel.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lstm_moe.config import LMConfig, NMTConfig
from lstm_moe.moe import (
    ExpertChoice,
    ExpertChoiceRouter,
    MoEConfig,
    MoELayer,
    combine_rows,
    plan_choice,
)
from lstm_moe.moe.dispatch import _combine_by_row
from lstm_moe.moe.workspace import Workspace
from switch.config import TransformerLMConfig, TransformerNMTConfig

D, H, E = 6, 10, 4


def layer_of(n_experts=E, capacity_factor=None, dtype=torch.float32, **options) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(
        D, n_experts, H, 1, "expert_choice", capacity_factor=capacity_factor, **options
    ).to(dtype)
    with torch.no_grad():  # affinities far apart, so that no two tokens tie
        layer.router.w_gate.normal_(0.0, 1.0)
    return layer


def reference(layer: MoELayer, x: torch.Tensor, mask: torch.Tensor | None = None):
    """One expert at a time: S = softmax(x·W_g) token by token; each expert sorts the real
    tokens by its column of S and takes the first C = ceil(c·n/E); y_t sums S[t, e]·E_e(x_t)
    over the experts that took t. Returns (y, tokens taken by each expert)."""
    w_gate = layer.router.w_gate
    experts = layer.experts
    n_experts = w_gate.shape[1]
    real = list(range(x.shape[0])) if mask is None else [t for t in range(len(mask)) if mask[t]]
    affinity = {t: torch.softmax(x[t] @ w_gate, 0) for t in real}
    c = layer.router.current_capacity_factor()
    capacity = min(len(real), max(1, math.ceil(c * len(real) / n_experts)))
    rows = [torch.zeros(D, dtype=x.dtype) for _ in range(x.shape[0])]
    taken = []
    for e in range(n_experts):
        ranked = sorted(real, key=lambda t: -float(affinity[t][e].detach()))[:capacity]
        taken.append(sorted(ranked))
        for t in ranked:
            hidden = F.relu(x[t] @ experts.w_in[e])
            rows[t] = rows[t] + affinity[t][e] * (hidden @ experts.w_out[e])
    return torch.stack(rows), taken


def test_capacity_is_c_tokens_over_experts_rounded_up():
    router = ExpertChoiceRouter(D, 4)  # c = 2 by default
    assert [router.tokens_per_expert(n) for n in (0, 1, 3, 10, 11)] == [0, 1, 2, 5, 6]
    router = ExpertChoiceRouter(D, 4, capacity_factor=1.25, eval_capacity_factor=3.0)
    assert router.tokens_per_expert(10) == 4  # ceil(3.125)
    assert router.tokens_per_expert(2) == 1
    router.eval()
    assert router.tokens_per_expert(10) == 8  # ceil(7.5)
    assert router.tokens_per_expert(3) == 3  # never more than the batch
    assert ExpertChoiceRouter(D, 2, capacity_factor=8.0).tokens_per_expert(5) == 5


@pytest.mark.parametrize("n_tokens,capacity_factor", [(10, None), (7, 1.0), (13, 0.5), (3, 4.0)])
@pytest.mark.parametrize("training", [True, False])
def test_each_expert_takes_exactly_its_capacity(n_tokens, capacity_factor, training):
    layer = layer_of(capacity_factor=capacity_factor).train(training)
    result = layer(torch.randn(n_tokens, D))
    capacity = layer.router.tokens_per_expert(n_tokens)
    assert result.stats.tokens_per_expert.tolist() == [capacity] * E
    assert result.stats.load.tolist() == [capacity] * E
    assert float(result.stats.fraction_dropped) == 0.0
    assert float(result.stats.max_over_mean_load) == 1.0
    assert result.losses == {} and float(result.aux_loss) == 0.0


@pytest.mark.parametrize("capacity_factor", [None, 0.5, 1.0, 3.0])
def test_the_layer_equals_the_per_expert_reference_with_gradients(capacity_factor):
    layer = layer_of(capacity_factor=capacity_factor, dtype=torch.float64)
    x = torch.randn(11, D, dtype=torch.float64, requires_grad=True)
    projection = torch.randn(11, D, dtype=torch.float64)
    result = layer(x)
    (result.output * projection).sum().backward()
    parameters = [layer.router.w_gate, layer.experts.w_in, layer.experts.w_out]
    got_grads = [x.grad, *(p.grad for p in parameters)]
    for p in parameters:
        p.grad = None
    x_ref = x.detach().clone().requires_grad_(True)
    want, taken = reference(layer, x_ref)
    (want * projection).sum().backward()
    want_grads = [x_ref.grad, *(p.grad for p in parameters)]
    torch.testing.assert_close(result.output, want, rtol=1e-12, atol=1e-12)
    for got, expected in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    # The importance is Σ of the gates each expert took.
    affinity = torch.softmax(x.detach() @ layer.router.w_gate.detach(), -1)
    importance = [float(affinity[taken[e], e].sum()) for e in range(E)]
    torch.testing.assert_close(result.stats.importance.tolist(), importance)


def test_gradcheck_through_router_and_experts():
    layer = layer_of(capacity_factor=1.5, dtype=torch.float64)
    x = torch.randn(7, D, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: layer(x).output, (x,))
    for name in ("router.w_gate", "experts.w_in", "experts.w_out"):
        value = layer.get_parameter(name).detach().clone().requires_grad_(True)
        assert torch.autograd.gradcheck(
            lambda w, name=name: _layer_with(layer, name, w, x), (value,)
        )


def _layer_with(layer: MoELayer, name: str, value: torch.Tensor, x: torch.Tensor):
    """The layer's output with one parameter replaced by `value` (differentiable in it)."""
    return torch.func.functional_call(layer, {name: value}, (x.detach(),)).output


def test_padding_is_never_chosen_and_real_tokens_get_their_unpadded_result():
    layer = layer_of()
    real = torch.randn(9, D)
    mask = torch.tensor([True, False, True, True, False, True, True, True, False, True, True, True])
    x = torch.full((12, D), 50.0)  # padding that would win every expert's choice if it counted
    x[mask] = real
    padded, alone = layer(x, mask), layer(real)
    assert (padded.output[~mask] == 0).all()
    torch.testing.assert_close(padded.output[mask], alone.output, rtol=0, atol=0)
    assert torch.equal(padded.stats.tokens_per_expert, alone.stats.tokens_per_expert)
    want, _ = reference(layer, x, mask)
    torch.testing.assert_close(padded.output, want, rtol=1e-5, atol=1e-6)


def test_tokens_without_an_expert_get_zero_and_are_counted():
    layer = layer_of(n_experts=2, capacity_factor=0.5)  # 2 experts x ceil(0.5·8/2)=2 of 8
    x = torch.randn(8, D)
    result = layer(x)
    _, taken = reference(layer, x)
    chosen = set(taken[0]) | set(taken[1])
    unchosen = [t for t in range(8) if t not in chosen]
    assert unchosen and (result.output[unchosen] == 0).all()
    fraction = result.stats.extra["fraction_tokens_without_expert"]
    assert float(fraction) == pytest.approx(len(unchosen) / 8)
    most = max(sum(t in taken[e] for e in range(2)) for t in range(8))
    assert float(result.stats.extra["experts_per_token_max"]) == most


def test_the_routing_lists_its_pairs_expert_major():
    layer = layer_of()
    x = torch.randn(10, D)
    routing = layer.router(x)
    assert routing.expert_index is None and routing.gates is None
    token, expert, gate = routing.pairs()
    _, taken = reference(layer, x)
    assert token.tolist() == [t for e in range(E) for t in taken[e]]
    assert expert.tolist() == [e for e in range(E) for _ in taken[e]]
    affinity = torch.softmax(x @ layer.router.w_gate.detach(), -1)
    torch.testing.assert_close(gate, affinity[token, expert])


def test_token_major_routings_list_their_pairs_too():
    layer = MoELayer(D, E, H, 2, "switch")
    x = torch.randn(5, D)
    routing = layer.router(x, mask=torch.tensor([True, True, False, True, True]))
    token, expert, gate = routing.pairs()
    want = [(t, int(routing.expert_index[t, s])) for t in range(5) for s in range(2) if t != 2]
    assert list(zip(token.tolist(), expert.tolist(), strict=True)) == want
    assert gate.tolist() == routing.gates[[0, 1, 3, 4]].reshape(-1).tolist()


@pytest.mark.parametrize("n_rows", [5, 3000])  # one block, and several blocks of rows
def test_a_by_row_plan_combines_like_its_formula_on_every_path(n_rows):
    n_tokens, width = 7 if n_rows == 5 else 900, 96
    generator = torch.Generator().manual_seed(3)
    token_index = torch.randint(n_tokens, (n_rows,), generator=generator)
    rows_per_expert = torch.tensor([n_rows - n_rows // 2, n_rows // 2])
    gates = torch.rand(n_rows, generator=generator, dtype=torch.float64, requires_grad=True)
    out = torch.randn(n_rows, width, generator=generator, dtype=torch.float64, requires_grad=True)
    plan = plan_choice(ExpertChoice(token_index, gates, rows_per_expert), n_tokens)
    assert plan.gates_by_row and torch.equal(plan.routed_per_expert, rows_per_expert)
    grad_y = torch.randn(n_tokens, width, generator=generator, dtype=torch.float64)
    results = []
    for y in (combine_rows(out, gates, plan, Workspace()), _combine_by_row(out, gates, plan)):
        results.append((y, *torch.autograd.grad(y, (out, gates), grad_y)))
    want = torch.zeros(n_tokens, width, dtype=torch.float64)
    for row in range(n_rows):
        want[token_index[row]] += gates[row].detach() * out[row].detach()
    for got in results:
        torch.testing.assert_close(got[0], want)
        torch.testing.assert_close(got[1], gates.detach().unsqueeze(-1) * grad_y[token_index])
        torch.testing.assert_close(got[2], (grad_y[token_index] * out.detach()).sum(-1))


def test_the_config_counts_c_experts_per_token():
    assert MoEConfig(D, E, H, router="expert_choice").mean_experts_per_token == 2.0
    config = MoEConfig(D, E, H, router="expert_choice", capacity_factor=1.5)
    assert config.mean_experts_per_token == 1.5
    assert MoEConfig(D, E, H, k=3).mean_experts_per_token == 3
    # Its eval capacity factor needs no training one (None means c = 2, not dropless).
    MoEConfig(D, E, H, router="expert_choice", eval_capacity_factor=3.0)


def _moe(**options) -> MoEConfig:
    return MoEConfig(d_model=8, n_experts=4, expert_hidden=8, router="expert_choice", **options)


@pytest.mark.parametrize(
    "build",
    [
        lambda **f: LMConfig(vocab_size=20, d_model=8, lstm_hidden=8, moe=_moe(), **f),
        lambda **f: NMTConfig(vocab_size=20, d_model=8, lstm_hidden=8, moe=_moe(), **f),
        lambda **f: TransformerLMConfig(vocab_size=20, d_model=8, n_layers=2, n_heads=2,
                                        ffn_hidden=8, moe=_moe(), moe_layers=(1,), **f),
        lambda **f: TransformerNMTConfig(vocab_size=20, d_model=8, encoder_layers=1,
                                         decoder_layers=1, n_heads=2, ffn_hidden=8, moe=_moe(),
                                         encoder_moe_layers=(0,), decoder_moe_layers=(0,), **f),
    ],
    ids=["lstm-lm", "lstm-nmt", "transformer-lm", "transformer-nmt"],
)  # fmt: skip
def test_causal_stacks_refuse_expert_choice_unless_allowed(build):
    with pytest.raises(ValueError, match=r"chooses among the whole batch.*allow_noncausal_routing"):
        build()
    build(allow_noncausal_routing=True)


def test_encoders_take_expert_choice_freely():
    NMTConfig(vocab_size=20, d_model=8, lstm_hidden=8, moe=_moe(), decoder_layers=("lstm",))
    TransformerNMTConfig(vocab_size=20, d_model=8, encoder_layers=1, decoder_layers=1,
                         n_heads=2, ffn_hidden=8, moe=_moe(), encoder_moe_layers=(0,),
                         decoder_moe_layers=())  # fmt: skip
    # A language model without MoE layers has nothing to refuse.
    LMConfig(vocab_size=20, d_model=8, lstm_hidden=8, moe=_moe(), layers=("lstm",))
