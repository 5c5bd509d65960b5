"""The Switch Transformer options of the experts: the reduced truncated-normal initialisation
(Switch §2.4), dropout inside the experts (Switch §2.4, Table 4), a capacity factor of its own
in evaluation, and GEGLU experts (Shazeer 2020, §2).

Golden values: the initialisation's bounds and standard deviation, hand-computed capacities.
Equivalence: GEGLU against the token-by-token reference (tests/moe/reference.py) in outputs
and gradients; dropout against the same computation with the same mask drawn by hand; the
sharded layer at 2 gloo ranks against one process.
"""

from __future__ import annotations

import dataclasses
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from lstm_moe.moe import (
    MoEConfig,
    MoELayer,
    ParallelGroup,
    expert_tensor_names,
    gather_state_dict,
    shard_state_dict,
)
from lstm_moe.moe.experts import BatchedExperts, expert_feed_forward
from lstm_moe.moe.initializers import TRUNCATED_STD
from tests.ranks import free_port

from . import reference
from .test_layer_vs_reference import fast, run, slow
from .test_parallel import Checks, grad_or_zero, summed_grad

D, H = 12, 16  # rows of 48 and 64 bytes, as in the other layer tests


def experts_of(counts: list[int], **options) -> tuple[BatchedExperts, torch.Tensor, torch.Tensor]:
    """Experts with no biases, expert-contiguous rows [N, D] and their counts [E]."""
    experts = BatchedExperts(len(counts), D, H, bias=False, **options)
    rows = torch.randn(sum(counts), D)
    return experts, rows, torch.tensor(counts)


# Reduced initialisation (Switch §2.4) ------------------------------------------------------


@pytest.mark.parametrize("scale", [0.1, 1.0])
def test_trunc_normal_init_has_the_target_std_within_two_corrected_stds(scale):
    d_model, hidden = 64, 256
    experts = BatchedExperts(
        4, d_model, hidden, bias=False, init="trunc_normal", init_scale=scale, activation="geglu"
    )
    for name, fan_in in (("w_in", d_model), ("w_gate", d_model), ("w_out", hidden)):
        values = getattr(experts, name).detach()  # 65 536 values
        std = (scale / fan_in) ** 0.5
        bound = 2 * std / TRUNCATED_STD  # the cut at ±2σ of the normal drawn, σ = std / 0.8796
        assert values.abs().max() <= bound * (1 + 1e-6), name
        assert values.abs().max() > 0.98 * bound, name  # truncated there, not narrower
        assert abs(values.std().item() / std - 1) < 0.02, name
        assert abs(values.mean().item()) < 0.02 * std, name


def test_trunc_normal_init_zeroes_the_biases():
    experts = BatchedExperts(3, D, H, bias=True, init="trunc_normal")
    assert experts.b_in.abs().max() == 0 and experts.b_out.abs().max() == 0
    assert experts.w_in.abs().max() > 0


@pytest.mark.parametrize("activation", ["relu", "geglu"])
def test_trunc_normal_shards_are_the_slices_of_one_process_init(activation):
    options = dict(bias=False, init="trunc_normal", activation=activation)
    torch.manual_seed(5)
    full = BatchedExperts(6, D, H, **options)
    after_full = torch.randn(3)
    for first, last in ((0, 3), (3, 6)):  # the two ranks of 2
        torch.manual_seed(5)
        shard = BatchedExperts(6, D, H, expert_range=(first, last), **options)
        assert torch.equal(torch.randn(3), after_full)  # the global stream moves on alike
        for key, value in shard.state_dict().items():
            assert torch.equal(value, full.state_dict()[key][first:last]), key
    assert not torch.equal(full.w_in[0], full.w_in[1])


def test_a_geglu_expert_draws_its_gate_after_the_relu_experts_weights():
    torch.manual_seed(2)
    relu = BatchedExperts(4, D, H, bias=False)
    torch.manual_seed(2)
    geglu = BatchedExperts(4, D, H, bias=False, activation="geglu")
    assert torch.equal(relu.w_in, geglu.w_in) and torch.equal(relu.w_out, geglu.w_out)
    bound = 1 / D**0.5  # uniform, like nn.Linear's W_in
    assert 0.9 * bound < geglu.w_gate.abs().max() <= bound


# Expert dropout (Switch §2.4, Table 4) -------------------------------------------------------


@pytest.mark.usefixtures("cpu_expert_path")
def test_expert_dropout_changes_nothing_in_evaluation():
    torch.manual_seed(0)
    plain = MoELayer(D, 8, H, 2).eval()
    torch.manual_seed(0)
    dropped = MoELayer(D, 8, H, 2, expert_dropout=0.5).eval()
    with torch.no_grad():
        for layer in (plain, dropped):
            layer.router.w_gate.copy_(torch.linspace(-1, 1, D * 8).view(D, 8))
    x = torch.randn(9, D)
    assert torch.equal(dropped(x).output, plain(x).output)


def test_zero_expert_dropout_in_training_is_the_fast_path():
    experts, rows, counts = experts_of([3, 0, 5, 4], dropout=0.0)
    experts.train()
    want = expert_feed_forward(rows, experts.w_in, experts.w_out, counts)
    assert torch.equal(experts(rows, counts), want)


@pytest.mark.usefixtures("cpu_expert_path")
@pytest.mark.parametrize("training", [True, False])
def test_the_dropout_path_without_its_mask_equals_the_fast_path(monkeypatch, training):
    """The generic products (dropout > 0 in training) compute the fused paths' function: with
    dropout made the identity, outputs and gradients agree."""
    torch.manual_seed(0)
    fused = MoELayer(D, 8, H, 2, capacity_factor=0.75).train(training)
    torch.manual_seed(0)
    generic = MoELayer(D, 8, H, 2, capacity_factor=0.75, expert_dropout=0.3).train(training)
    with torch.no_grad():
        for layer in (fused, generic):
            layer.router.w_gate.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(F, "dropout", lambda hidden, p, training: hidden)
    x = torch.randn(9, D)
    want = run(fast, fused, x, seed=7)
    got = run(fast, generic, x, seed=7)
    tol = dict(atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[0], want[0], **tol)
    torch.testing.assert_close(got[3], want[3], **tol)
    for name, grad in want[4].items():
        torch.testing.assert_close(got[4][name], grad, **tol, msg=name)


def _per_expert(experts: BatchedExperts, rows, counts, mask=None):
    """Σ over experts, one at a time: hidden ⊙ mask (dropout's mask, scaled) then W_out."""
    out, start = [], 0
    for e, n in enumerate(counts.tolist()):
        block = rows[start : start + n]
        hidden = block @ experts.w_in[e]
        if experts.w_gate is not None:
            hidden = F.gelu(block @ experts.w_gate[e]) * hidden
        else:
            hidden = torch.relu(hidden)
        if mask is not None:
            hidden = hidden * mask[start : start + n]
        out.append(hidden @ experts.w_out[e])
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("activation", ["relu", "geglu"])
def test_expert_dropout_in_training_is_one_mask_on_the_hidden_units(activation):
    """With a seed, the layer's dropout is the mask F.dropout draws for [N, H] at that seed:
    the output and every gradient equal a per-expert computation with that mask."""
    p = 0.3
    experts, rows, counts = experts_of([3, 0, 5, 4], dropout=p, activation=activation)
    experts.train()
    rows.requires_grad_(True)
    torch.manual_seed(11)
    got = experts(rows, counts)
    got.pow(2).sum().backward()
    got_grads = [t.grad.clone() for t in (rows, *experts.parameters())]
    torch.manual_seed(11)
    mask = F.dropout(torch.ones(rows.shape[0], H), p, training=True)  # [N, H], 0 or 1/(1-p)
    assert 0 < int((mask == 0).sum()) < mask.numel()
    for t in (rows, *experts.parameters()):
        t.grad = None
    want = _per_expert(experts, rows, counts, mask)
    want.pow(2).sum().backward()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    for got_grad, t in zip(got_grads, (rows, *experts.parameters()), strict=True):
        torch.testing.assert_close(got_grad, t.grad, atol=1e-5, rtol=1e-5)
    # The mask changes the output; its expectation does not.
    plain = _per_expert(experts, rows, counts).detach()
    assert not torch.allclose(got, plain)
    with torch.no_grad():
        mean = torch.stack([experts(rows, counts) for _ in range(2000)]).mean(0)
    torch.testing.assert_close(mean, plain, atol=0.05 * float(plain.abs().max()), rtol=0)


# The capacity factor in evaluation -----------------------------------------------------------


def _all_to_expert_zero(**options) -> tuple[MoELayer, torch.Tensor]:
    """A switch layer of 2 experts to which all 8 tokens route to expert 0."""
    layer = MoELayer(D, 2, H, 1, "switch", jitter_eps=0.0, **options)
    with torch.no_grad():
        layer.router.w_router.zero_()
        layer.router.w_router[:, 0] = 1.0
    return layer, torch.rand(8, D) + 0.1  # positive rows: expert 0's logit is the largest


def test_eval_capacity_factor_sets_the_capacity_in_evaluation_only():
    layer, x = _all_to_expert_zero(capacity_factor=0.5, eval_capacity_factor=1.5)
    # Training: ceil(0.5 · 8 tokens · 1 / 2 experts) = 2 rows kept of 8.
    stats = layer.train()(x).stats
    assert stats.tokens_per_expert.tolist() == [2, 0]
    assert float(stats.fraction_dropped) == pytest.approx(6 / 8)
    # Evaluation: ceil(1.5 · 8 · 1 / 2) = 6.
    stats = layer.eval()(x).stats
    assert stats.tokens_per_expert.tolist() == [6, 0]
    assert float(stats.fraction_dropped) == pytest.approx(2 / 8)
    # Without it, evaluation keeps the training factor.
    layer, x = _all_to_expert_zero(capacity_factor=0.5)
    assert layer.eval()(x).stats.tokens_per_expert.tolist() == [2, 0]
    assert layer.config.capacity_factor_for(False) == layer.config.capacity_factor_for(True)


def test_a_config_of_the_new_options_rebuilds_the_same_layer():
    options = dict(
        expert_init="trunc_normal",
        expert_init_scale=0.2,
        expert_dropout=0.1,
        capacity_factor=1.25,
        eval_capacity_factor=2.0,
        expert_activation="geglu",
    )
    layer = MoELayer(D, 4, H, 1, "switch", **options)
    again = MoELayer.from_config(layer.config)
    assert again.config == layer.config
    assert {name: getattr(again.config, name) for name in options} == options
    assert again.experts.dropout == 0.1 and again.experts.w_gate.shape == (4, D, H)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(eval_capacity_factor=2.0), "eval_capacity_factor needs a capacity_factor"),
        (dict(capacity_factor=1.0, eval_capacity_factor=0.0), "eval_capacity_factor must be > 0"),
        (dict(expert_init="normal"), "expert_init must be one of"),
        (dict(expert_init_scale=0.0), "expert_init_scale must be > 0"),
        (dict(expert_dropout=1.0), r"expert_dropout must be in \[0, 1\)"),
        (dict(expert_dropout=-0.1), r"expert_dropout must be in \[0, 1\)"),
        (dict(expert_activation="swiglu"), "expert_activation must be one of"),
        (dict(expert_activation="geglu", expert_bias=True), "takes no expert_bias"),
    ],
)
def test_invalid_expert_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(D, 4, H, k=1, **options)


def test_the_defaults_are_the_2017_experts():
    config = MoEConfig(D, 4, H)
    assert (config.expert_init, config.expert_activation) == ("uniform", "relu")
    assert (config.expert_dropout, config.eval_capacity_factor) == (0.0, None)
    assert config.expert_ops_per_token() == 2 * D * H
    assert dataclasses.replace(config, expert_activation="geglu").expert_ops_per_token() == (
        3 * D * H
    )
    assert "w_gate" not in dict(MoELayer.from_config(config).experts.named_parameters())


# GEGLU experts (Shazeer 2020, §2) ------------------------------------------------------------

GEGLU_CASES = {
    "noisy_topk": dict(n_experts=8, k=3, router="noisy_topk"),
    # The strictly balanced gate in training: one bmm per product over equal counts.
    "batchwise": dict(n_experts=6, k=2, router="batchwise"),
    # More experts than pairs: some experts receive no rows.
    "idle_experts": dict(n_experts=32, k=2, router="noisy_topk"),
}


def geglu_layer(case: str, capacity_factor, dtype) -> MoELayer:
    options = dict(GEGLU_CASES[case])
    n_experts, k, router = options.pop("n_experts"), options.pop("k"), options.pop("router")
    layer = MoELayer(
        D, n_experts, H, k, router, capacity_factor=capacity_factor, expert_activation="geglu"
    )
    with torch.no_grad():  # non-zero gating weights, so that routing depends on the input
        for name, p in layer.router.named_parameters():
            if name != "thresholds":
                p.normal_(0.0, 0.5)
    return layer.to(dtype)


@pytest.mark.usefixtures("cpu_expert_path")
@pytest.mark.parametrize("case", list(GEGLU_CASES))
@pytest.mark.parametrize("capacity_factor", [None, 0.75])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_geglu_layer_matches_the_per_expert_reference(case, capacity_factor, training, dtype):
    layer = geglu_layer(case, capacity_factor, dtype).train(training)
    assert layer.experts.w_gate is not None
    x = torch.randn(9, D, dtype=dtype)
    reference.NOISE_DTYPE[0] = dtype
    got = run(fast, layer, x, seed=7)
    want = run(slow, layer, x, seed=7)
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
    for i, what in ((0, "output"), (1, "aux_loss"), (3, "input gradient")):
        torch.testing.assert_close(got[i], want[i], **tol, msg=what)
    assert got[4].keys() == want[4].keys() and "experts.w_gate" in got[4]
    for name, grad in want[4].items():
        if grad is None:
            assert got[4][name] is None or got[4][name].abs().max() == 0, name
        else:
            torch.testing.assert_close(got[4][name], grad, **tol, msg=name)


def test_gradcheck_geglu_experts_fp64():
    experts = BatchedExperts(3, 4, 5, bias=False, activation="geglu").double()
    counts = torch.tensor([2, 0, 3])  # an expert with no rows
    names = [n for n, _ in experts.named_parameters()]

    def output(rows, *params):
        return torch.func.functional_call(
            experts, dict(zip(names, params, strict=True)), (rows, counts)
        )

    rows = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in experts.parameters()]
    assert torch.autograd.gradcheck(output, (rows, *params), eps=1e-6, atol=1e-6)


def test_the_geglu_gate_is_an_expert_tensor():
    layer = MoELayer(D, 4, H, 2, expert_activation="geglu")
    names = expert_tensor_names(layer)
    assert names == {"experts.w_in", "experts.w_gate", "experts.w_out"}
    assert layer.state_dict()["experts.w_gate"].shape == (4, D, H)
    assert "experts.w_gate" not in expert_tensor_names(MoELayer(D, 4, H, 2))


# At 2 gloo ranks -----------------------------------------------------------------------------

SPLIT = (9, 5)  # tokens per rank, uneven on purpose


def parallel_layer(process_group=None) -> MoELayer:
    """GEGLU experts with the reduced initialisation and both capacity factors; top-2 switch
    routing without jitter, so that nothing is drawn per token."""
    torch.manual_seed(0)
    layer = MoELayer(
        D,
        8,
        H,
        2,
        "switch",
        jitter_eps=0.0,
        capacity_factor=0.5,
        eval_capacity_factor=0.75,
        expert_init="trunc_normal",
        expert_activation="geglu",
        process_group=process_group,
    )
    with torch.no_grad():
        layer.router.w_router.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(3))
    return layer


def _forward_backward(layer, x, projection, aux_weight):
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    result = layer(x)
    ((result.output * projection).sum() + aux_weight * result.aux_loss).backward()
    return result, x.grad


def worker(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    checks = Checks(rank)
    try:
        group = ParallelGroup(dist.group.WORLD)
        first_row = sum(SPLIT[:rank])
        rows = slice(first_row, first_row + SPLIT[rank])
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(sum(SPLIT), D, generator=generator)
        projection = torch.linspace(-1, 1, x.numel()).view_as(x)
        single, sharded = parallel_layer(), parallel_layer(dist.group.WORLD)
        full_state, experts = single.state_dict(), expert_tensor_names(single)
        if "experts.w_gate" not in experts:
            checks.failures.append(f"rank {rank}: w_gate is not an expert tensor")
        for key, value in shard_state_dict(full_state, group, experts).items():
            checks.close(f"initial {key}", sharded.state_dict()[key], value, exact=True)
        for key, value in gather_state_dict(sharded.state_dict(), group, experts).items():
            checks.close(f"gathered {key}", value, full_state[key], exact=True)
        first, last = group.expert_range(8)
        for training in (True, False):
            single.train(training), sharded.train(training)
            want, want_x_grad = _forward_backward(single, x, projection, world)
            got, got_x_grad = _forward_backward(sharded, x[rows], projection[rows], 1.0)
            name = f"training={training}"
            checks.close(f"{name}: output", got.output, want.output[rows])
            checks.close(f"{name}: input gradient", got_x_grad, want_x_grad[rows])
            checks.close(
                f"{name}: tokens_per_expert",
                got.stats.tokens_per_expert,
                want.stats.tokens_per_expert,
                exact=True,
            )
            if not want.stats.fraction_dropped > 0:
                checks.failures.append(f"rank {rank}, {name}: the capacity dropped nothing")
            single_params = dict(single.named_parameters())
            for key, p in sharded.named_parameters():
                want_grad = grad_or_zero(single_params[key])
                if key.startswith("experts."):  # complete on the rank holding the expert
                    checks.close(f"{name}: grad {key}", grad_or_zero(p), want_grad[first:last])
                else:
                    checks.close(f"{name}: grad {key} summed", summed_grad(p), want_grad)
        checks.raise_if_any()
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_geglu_trunc_normal_layer_at_two_ranks_equals_one_process():
    mp.spawn(worker, args=(2, free_port()), nprocs=2, join=True)
