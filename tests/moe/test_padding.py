"""Padding never routes: a padded batch with its mask gives its real tokens exactly what those
tokens alone give, and the padded positions get nothing and count for nothing.

For every router (noisy top-k, hierarchical, batchwise, Switch top-1 and top-2), dropless and
with a capacity, in training and evaluation mode: the output of the real tokens, every loss, the
auxiliary loss, every routing statistic and the gradients (of the input, the router and the
experts) equal those of the unpadded batch; the output and the input gradient of a padded
position are exactly 0. The padded positions hold large random values, which would change the
losses, the capacity and the batchwise gate's m if they were counted (checked too).

Noise: the routers draw their noise for every row, padded ones included, so the padded batch
would give its real tokens other noise. The tests record the draws of the unpadded run
(torch.randn_like, torch.rand_like) and replay them in the padded run, each per-token draw
placed at the real rows (the padded rows get fresh values); a draw that is not per token (the
hierarchical gate's secondary draw over the real (token, group) pairs) has the same shape in
both runs and is replayed as it is.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from lstm_moe.moe import MoELayer
from lstm_moe.moe.parallel import ParallelGroup, mix_experts

D, H = 12, 16
TOL = dict(atol=1e-5, rtol=1e-5)
CASES = {
    "noisy_topk": dict(n_experts=8, k=2, router="noisy_topk"),
    "hierarchical": dict(
        n_experts=8, k=1, router="hierarchical", n_groups=4, k_groups=2, expert_bias=True
    ),
    "batchwise": dict(n_experts=8, k=2, router="batchwise"),
    # A large jitter, so that a wrong draw would change some routes.
    "switch_top1": dict(n_experts=8, k=1, router="switch", w_z=1e-2, jitter_eps=0.3),
    "switch_top2": dict(n_experts=8, k=2, router="switch", w_z=1e-2, jitter_eps=0.3),
}
# Real tokens per row of a [3, 7] batch: 16 real tokens, 5 padded ones, padding inside the
# flattened order (after rows 1 and 2), as a batch of sentences padded to one length has it.
LENGTHS = (7, 3, 6)
LENGTH = 7


def make_layer(case: str, capacity_factor) -> MoELayer:
    torch.manual_seed(0)
    options = dict(CASES[case])
    n_experts, k, router = options.pop("n_experts"), options.pop("k"), options.pop("router")
    layer = MoELayer(D, n_experts, H, k, router, capacity_factor=capacity_factor, **options)
    with torch.no_grad():  # non-zero gating weights, so that routing depends on the input
        for name, p in layer.router.named_parameters():
            if name == "thresholds":
                # Off 1/n: a padded row (zeros in, uniform gate values out) would sit exactly
                # on the initial thresholds and add nothing to the threshold loss.
                p.mul_(torch.linspace(0.5, 1.5, p.numel()))
            else:
                p.normal_(0.0, 0.5)
    return layer


def padding_mask() -> torch.Tensor:
    """[3, 7] bool, True for the real tokens."""
    return torch.arange(LENGTH).unsqueeze(0) < torch.tensor(LENGTHS).unsqueeze(1)


def pad(real: torch.Tensor, mask: torch.Tensor, scale: float = 100.0) -> torch.Tensor:
    """real: [N, D] placed at the True positions of mask [...]; large random values elsewhere."""
    padded = scale * torch.randn(*mask.shape, real.shape[-1])
    padded[mask] = real
    return padded


class NoiseTape:
    """The draws of torch.randn_like and torch.rand_like of one run, replayed in another."""

    def __init__(self) -> None:
        self.draws: list[tuple[str, torch.Tensor]] = []

    @contextlib.contextmanager
    def _patched(self, make):
        originals = {"randn_like": torch.randn_like, "rand_like": torch.rand_like}
        torch.randn_like = make("randn_like", originals["randn_like"])
        torch.rand_like = make("rand_like", originals["rand_like"])
        try:
            yield
        finally:
            torch.randn_like, torch.rand_like = originals["randn_like"], originals["rand_like"]

    def record(self):
        def make(kind, original):
            def draw(like, **options):
                noise = original(like, **options)
                self.draws.append((kind, noise.clone()))
                return noise

            return draw

        return self._patched(make)

    @contextlib.contextmanager
    def replay(self, mask: torch.Tensor):
        """mask: [T] bool, the real rows of the run that replays."""
        draws = iter(self.draws)

        def make(kind, original):
            def draw(like, **options):
                recorded_kind, noise = next(draws)
                assert recorded_kind == kind
                if like.shape == noise.shape:
                    return noise.clone()
                # A per-token draw: the real tokens' noise at their rows.
                assert like.shape[0] == mask.numel() and noise.shape[0] == int(mask.sum())
                out = original(like, **options)
                out[mask] = noise
                return out

            return draw

        with self._patched(make):
            yield
        assert next(draws, None) is None, "the padded run drew less noise"


def run(layer, x, projection, mask=None):
    """Forward and backward of (output · projection).sum() + aux_loss."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    result = layer(x, mask=mask)
    ((result.output * projection).sum() + result.aux_loss).backward()
    grads = {
        name: torch.zeros_like(p) if p.grad is None else p.grad.clone()
        for name, p in layer.named_parameters()
    }
    return result, x.grad, grads


def assert_same_stats(got, want) -> None:
    torch.testing.assert_close(got.tokens_per_expert, want.tokens_per_expert, atol=0, rtol=0)
    for stat in (
        "importance",
        "load",
        "cv_importance",
        "cv_load",
        "max_over_mean_load",
        "fraction_dropped",
    ):
        torch.testing.assert_close(getattr(got, stat), getattr(want, stat), **TOL, msg=stat)
    assert got.extra.keys() == want.extra.keys()
    for stat, value in want.extra.items():
        torch.testing.assert_close(got.extra[stat], value, **TOL, msg=stat)


def assert_same_results(got, want) -> None:
    torch.testing.assert_close(got.aux_loss, want.aux_loss, **TOL)
    assert got.losses.keys() == want.losses.keys()
    for name, value in want.losses.items():
        torch.testing.assert_close(got.losses[name], value, **TOL, msg=name)
    assert_same_stats(got.stats, want.stats)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
@pytest.mark.parametrize("training", [True, False])
def test_padded_batch_equals_its_real_tokens_alone(case, capacity_factor, training):
    layer = make_layer(case, capacity_factor).train(training)
    mask = padding_mask()  # [B, L]
    n_real = int(mask.sum())
    x_real = torch.randn(n_real, D)
    projection_real = torch.linspace(-1, 1, n_real * D).view(n_real, D)
    x, projection = pad(x_real, mask), pad(projection_real, mask, scale=1.0)  # [B, L, D]

    tape = NoiseTape()
    with tape.record():
        want, want_x_grad, want_grads = run(layer, x_real, projection_real)
    with tape.replay(mask.reshape(-1)):
        got, got_x_grad, got_grads = run(layer, x, projection, mask)

    assert got.output.shape == x.shape
    torch.testing.assert_close(got.output[mask], want.output, **TOL)
    assert torch.equal(got.output[~mask], torch.zeros(int((~mask).sum()), D))
    assert_same_results(got, want)
    torch.testing.assert_close(got_x_grad[mask], want_x_grad, **TOL)
    assert torch.equal(got_x_grad[~mask], torch.zeros(int((~mask).sum()), D))
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, **TOL, msg=name)
    if capacity_factor is not None:
        assert want.stats.fraction_dropped > 0  # the capacity matters in this case
    if training and case != "batchwise":
        assert tape.draws  # noise was drawn, and replayed


@contextlib.contextmanager
def no_noise():
    """torch.randn_like gives zeros and torch.rand_like one half (no jitter)."""
    originals = torch.randn_like, torch.rand_like
    torch.randn_like = lambda like, **_: torch.zeros_like(like)
    torch.rand_like = lambda like, **_: torch.full_like(like, 0.5)
    try:
        yield
    finally:
        torch.randn_like, torch.rand_like = originals


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_the_padding_would_change_the_results_if_it_were_counted(case, capacity_factor):
    """The cases above can fail: the same padded batch without its mask gives other losses,
    and (with a capacity) other rows per expert."""
    layer = make_layer(case, capacity_factor).train()
    mask = padding_mask()
    x_real = torch.randn(int(mask.sum()), D)
    with no_noise():
        alone = layer(x_real)
        unmasked = layer(pad(x_real, mask))
    assert any(
        not torch.allclose(unmasked.losses[name], alone.losses[name], **TOL)
        for name in alone.losses
    )
    assert not torch.allclose(unmasked.aux_loss, alone.aux_loss, **TOL)
    if capacity_factor is not None:
        assert not torch.equal(unmasked.stats.tokens_per_expert, alone.stats.tokens_per_expert)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("training", [True, False])
def test_a_mask_of_only_real_tokens_changes_nothing(case, training):
    layer = make_layer(case, 0.5).train(training)
    x = torch.randn(3, 5, D)
    torch.manual_seed(3)
    plain = layer(x)
    torch.manual_seed(3)
    masked = layer(x, mask=torch.ones(3, 5, dtype=torch.bool))
    torch.testing.assert_close(masked.output, plain.output, atol=0, rtol=0)
    torch.testing.assert_close(masked.aux_loss, plain.aux_loss, atol=0, rtol=0)
    assert_same_stats(masked.stats, plain.stats)


@pytest.mark.parametrize("case", list(CASES))
def test_nan_and_inf_in_padded_positions_reach_nothing(case):
    layer = make_layer(case, 0.5).train()
    mask = padding_mask()
    x = torch.randn(*mask.shape, D)
    x[~mask] = float("nan")
    x[1, -1], x[2, -1, 0] = float("inf"), float("-inf")  # padded positions too
    result, x_grad, grads = run(layer, x, torch.ones_like(x), mask)
    assert torch.isfinite(result.output).all() and torch.isfinite(result.aux_loss)
    assert torch.equal(result.output[~mask], torch.zeros(int((~mask).sum()), D))
    assert torch.equal(x_grad[~mask], torch.zeros(int((~mask).sum()), D))
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("training", [True, False])
def test_a_batch_of_padding_only(case, training):
    layer = make_layer(case, 0.5).train(training)
    x = torch.randn(2, 4, D, requires_grad=True)
    result = layer(x, mask=torch.zeros(2, 4, dtype=torch.bool))
    assert torch.equal(result.output, torch.zeros(2, 4, D))
    assert result.stats.tokens_per_expert.sum() == 0
    assert result.stats.fraction_dropped == 0
    assert torch.isfinite(result.aux_loss)
    (result.output.sum() + result.aux_loss).backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert layer.experts.w_in.grad is None or not layer.experts.w_in.grad.any()


def test_the_dispatcher_never_sends_a_masked_token_and_sizes_capacity_by_real_ones():
    """Hand-set routing that sends every token to expert 0, masked ones too: the masked ones
    stay home, and the capacity is ceil(0.5 · 6 real tokens · 1 / 2 experts) = 2, not
    ceil(0.5 · 10 · 1 / 2) = 3."""
    seen = []

    def experts(rows, rows_per_expert):
        seen.append(rows.clone())
        return rows + 1.0

    tokens = torch.arange(10.0).unsqueeze(1).repeat(1, 3)  # [10, 3], token t holds t
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1, 1], dtype=torch.bool)
    expert_index = torch.zeros(10, 1, dtype=torch.int64)
    gates = torch.ones(10, 1)
    output, dispatch = mix_experts(
        tokens, expert_index, gates, experts, 2, ParallelGroup(), 0.5, 1, mask=mask
    )
    assert dispatch.n_tokens == 6
    assert dispatch.rows_per_expert.tolist() == [2, 0]
    assert dispatch.routed_per_expert.tolist() == [6, 0]
    assert seen[0][:, 0].tolist() == [0.0, 2.0]  # the first two real tokens
    assert output[:, 0].tolist() == [1.0, 0, 3.0] + [0.0] * 7
    unmasked = mix_experts(tokens, expert_index, gates, experts, 2, ParallelGroup(), 0.5, 1)
    assert unmasked[1].rows_per_expert.tolist() == [3, 0]


def test_a_mask_of_the_wrong_shape_or_dtype_is_refused():
    layer = MoELayer(D, 4, H, 2)
    x = torch.randn(3, 5, D)
    with pytest.raises(ValueError, match=r"mask must be bool of shape \(3, 5\)"):
        layer(x, mask=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be bool"):
        layer(x, mask=torch.ones(3, 5))
    with pytest.raises(ValueError, match=r"mask must be bool of shape \(15,\)"):
        layer.router(x.view(15, D), mask=torch.ones(14, dtype=torch.bool))
