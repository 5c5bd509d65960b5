"""Golden values: the paper's formulas on cases worked by hand (App. A, App. F, Switch §2.2)."""

import math

import pytest
import torch

from lstm_moe.moe import cv_squared, expert_capacity, prob_in_top_k
from lstm_moe.moe.losses import batchwise_threshold_loss, importance

# Standard normal CDF values from a table: Φ(0.2), Φ(0.3), Φ(0.8), Φ(1.2), Φ(1.3).
PHI = {0.2: 0.5792597, 0.3: 0.6179114, 0.8: 0.7881446, 1.2: 0.8849303, 1.3: 0.9031995}


def phi(z):
    return PHI[z] if z >= 0 else 1.0 - PHI[-z]


def test_cv_squared_hand_values():
    # [1, 2, 3]: mean 2, population variance 2/3, CV² = (2/3) / 4 = 1/6.
    assert cv_squared(torch.tensor([1.0, 2.0, 3.0])).item() == pytest.approx(1 / 6, rel=1e-6)
    # [0, 0, 4]: mean 4/3, variance (16/9 + 16/9 + 64/9) / 3 = 32/9, CV² = (32/9) / (16/9) = 2.
    assert cv_squared(torch.tensor([0.0, 0.0, 4.0])).item() == pytest.approx(2.0, rel=1e-6)
    assert cv_squared(torch.tensor([5.0, 5.0, 5.0, 5.0])).item() == 0.0
    assert cv_squared(torch.tensor([7.0])).item() == 0.0


def test_cv_squared_gradient_is_finite_when_balanced_or_empty():
    for values in ([2.0, 2.0, 2.0], [0.0, 0.0, 0.0]):
        v = torch.tensor(values, requires_grad=True)
        cv_squared(v).backward()
        assert torch.isfinite(v.grad).all()
        assert v.grad.abs().max().item() == 0.0  # balance is a minimum


def test_load_estimator_three_tokens_four_experts():
    """P(x, i) = Φ((clean_i − kth_excluding(H, k, i)) / std_i) with k = 2, worked by hand.

    Token 0: clean [1, 0, 0, -1], H [1.5, 0.2, -0.3, -1.0], std 1. Top 2 = {0, 1}.
      in the top k -> threshold is the 3rd largest, -0.3; outside -> the 2nd largest, 0.2.
      P = [Φ(1.3), Φ(0.3), Φ(-0.2), Φ(-1.2)]
    Token 1: clean [0, 2, 0, 0], H [0.4, 1.0, -2.0, 0.6], std 2. Top 2 = {1, 3}; 3rd = 0.4.
      P = [Φ(-0.6/2), Φ(1.6/2), Φ(-0.6/2), Φ(-0.4/2)] = [Φ(-0.3), Φ(0.8), Φ(-0.3), Φ(-0.2)]
    Token 2: clean 0, H [0.1, -0.1, 0.3, -0.2], std 0.5. Top 2 = {2, 0}; 3rd = -0.1.
      P = [Φ(0.1/0.5), Φ(-0.1/0.5), Φ(0.1/0.5), Φ(-0.1/0.5)] = [Φ(0.2), Φ(-0.2), Φ(0.2), Φ(-0.2)]
    """
    clean = torch.tensor([[1.0, 0.0, 0.0, -1.0], [0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    noisy = torch.tensor([[1.5, 0.2, -0.3, -1.0], [0.4, 1.0, -2.0, 0.6], [0.1, -0.1, 0.3, -0.2]])
    std = torch.tensor([1.0, 2.0, 0.5]).unsqueeze(1).expand(3, 4)
    k = 2
    top_values, top_index = noisy.topk(k + 1, dim=-1)
    in_top_k = torch.zeros(3, 4, dtype=torch.bool).scatter(1, top_index[:, :k], True)
    p = prob_in_top_k(clean, std, top_values, in_top_k, k)
    expected = torch.tensor(
        [
            [phi(1.3), phi(0.3), phi(-0.2), phi(-1.2)],
            [phi(-0.3), phi(0.8), phi(-0.3), phi(-0.2)],
            [phi(0.2), phi(-0.2), phi(0.2), phi(-0.2)],
        ]
    )
    torch.testing.assert_close(p, expected, atol=1e-6, rtol=0)
    # Load (Eq. 10) is the column sum.
    torch.testing.assert_close(p.sum(0), expected.sum(0), atol=3e-6, rtol=0)


def test_load_estimator_matches_monte_carlo():
    """P(x, i) is the probability that expert i is in the top k when only its own noise is
    drawn again. Estimate that by sampling: with 400k draws the standard error of a
    probability is at most sqrt(0.25 / 4e5) = 7.9e-4, so 4e-3 is five standard errors."""
    gen = torch.Generator().manual_seed(0)
    n_experts, k, draws = 6, 2, 400_000
    clean = torch.randn(n_experts, generator=gen, dtype=torch.float64)
    std = torch.rand(n_experts, generator=gen, dtype=torch.float64) + 0.3
    noisy = clean + torch.randn(n_experts, generator=gen, dtype=torch.float64) * std
    top_values, top_index = noisy.topk(k + 1)
    in_top_k = torch.zeros(n_experts, dtype=torch.bool).scatter(0, top_index[:k], True)
    p = prob_in_top_k(clean[None], std[None], top_values[None], in_top_k[None], k)[0]
    for i in range(n_experts):
        resampled = noisy.expand(draws, n_experts).clone()
        resampled[:, i] = clean[i] + torch.randn(draws, generator=gen, dtype=torch.float64) * std[i]
        kept = (resampled.topk(k, dim=-1).indices == i).any(-1).double().mean()
        assert abs(p[i].item() - kept.item()) < 4e-3, (i, p[i].item(), kept.item())


def test_load_estimator_expectation_matches_top_k_frequency():
    """Averaged over full noise draws, P(x, i) has the same mean as the indicator that i is in
    the top k (tower property). 100k draws: standard error ≤ 1.6e-3 per mean; tolerance 8e-3."""
    gen = torch.Generator().manual_seed(1)
    n_experts, k, draws = 5, 3, 100_000
    clean = torch.randn(n_experts, generator=gen, dtype=torch.float64).expand(draws, -1)
    std = (torch.rand(n_experts, generator=gen, dtype=torch.float64) + 0.5).expand(draws, -1)
    noisy = clean + torch.randn(draws, n_experts, generator=gen, dtype=torch.float64) * std
    top_values, top_index = noisy.topk(k + 1, dim=-1)
    in_top_k = torch.zeros(draws, n_experts, dtype=torch.bool).scatter(1, top_index[:, :k], True)
    p = prob_in_top_k(clean, std, top_values, in_top_k, k)
    torch.testing.assert_close(p.mean(0), in_top_k.double().mean(0), atol=8e-3, rtol=0)


def test_importance_sums_gates_per_expert():
    gates = torch.tensor([[0.7, 0.3], [0.6, 0.4], [1.0, 0.0]])
    index = torch.tensor([[0, 2], [2, 1], [3, -1]])  # -1: an unused slot
    torch.testing.assert_close(importance(gates, index, 4), torch.tensor([0.7, 0.4, 0.9, 1.0]))


def test_expert_capacity_arithmetic():
    assert expert_capacity(8192, 4, 32, 1.25) == 1280  # 1.25 · 8192 · 4 / 32
    assert expert_capacity(10, 1, 3, 1.0) == 4  # ceil(3.33)
    assert expert_capacity(3, 1, 64, 1.0) == 1  # never zero
    with pytest.raises(ValueError, match="capacity_factor"):
        expert_capacity(10, 1, 3, 0.0)


def test_batchwise_threshold_loss_hand_case():
    """Eq. 20 / |X|. Values X = [[0.5, 0.1], [0.2, 0.6]], T = [0.3, 0.3].
    Threshold mask: [[1, 0], [0, 1]]. Batchwise mask (m = 1): [[1, 0], [0, 1]] -> agree: 0.
    With batchwise mask [[1, 1], [0, 0]]: entries (0,1): (0 − 1)(0.1 − 0.3) = 0.2;
    (1,1): (1 − 0)(0.6 − 0.3) = 0.3; total 0.5, divided by |X| = 2 -> 0.25."""
    values = torch.tensor([[0.5, 0.1], [0.2, 0.6]])
    thresholds = torch.tensor([0.3, 0.3], requires_grad=True)
    agree = torch.tensor([[True, False], [False, True]])
    assert batchwise_threshold_loss(values, thresholds, agree).item() == pytest.approx(0.0)
    disagree = torch.tensor([[True, True], [False, False]])
    loss = batchwise_threshold_loss(values, thresholds, disagree)
    assert loss.item() == pytest.approx(0.25)
    loss.backward()
    # dL/dT_1 = −(−1 + 1)/2 = 0 for expert 1 (the two errors pull in opposite directions).
    torch.testing.assert_close(thresholds.grad, torch.tensor([0.0, 0.0]))
    assert math.isfinite(loss.item())
    # One error only: batchwise mask [[1, 0], [0, 0]] disagrees at (1, 1), where the threshold
    # keeps 0.6 that the batch drops: L = (1 − 0)(0.6 − T_1)/2, so dL/dT_1 = −1/2 (gradient
    # descent raises T_1 until it stops keeping that token).
    thresholds.grad = None
    one_error = torch.tensor([[True, False], [False, False]])
    loss = batchwise_threshold_loss(values, thresholds, one_error)
    assert loss.item() == pytest.approx(0.15)
    loss.backward()
    torch.testing.assert_close(thresholds.grad, torch.tensor([0.0, -0.5]))
