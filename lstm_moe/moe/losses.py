"""Auxiliary-loss formulas of Shazeer et al. 2017, Appendix A and F, as pure functions.

Index letters: R rows (tokens, or token-group pairs for a secondary gate), E experts,
K experts kept per row.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Keeps CV² finite when every entry is zero (e.g. no tokens reached a group).
CV_SQUARED_EPSILON = 1e-10


def cv_squared(values: Tensor) -> Tensor:
    """Squared coefficient of variation, `Var(v) / (Mean(v)² + ε)` (App. A, Eq. 7 and 11).

    Uses the population variance (divide by n), as the authors' released code does. Computed
    without a square root so the gradient stays finite when all entries are equal, which is
    exactly the state at zero initialisation of the gating weights. One entry gives 0.

    values: [E] float. Returns a scalar.
    """
    if values.numel() <= 1:
        return values.sum() * 0.0
    values = values.to(torch.promote_types(values.dtype, torch.float32))
    mean = values.mean()
    variance = (values - mean).pow(2).mean()
    return variance / (mean.pow(2) + CV_SQUARED_EPSILON)


def importance(gates: Tensor, expert_index: Tensor, n_experts: int) -> Tensor:
    """Importance(X) = Σ_x G(x) (Eq. 6): the summed gate value each expert receives.

    gates: [R, K] float; expert_index: [R, K] int64, -1 marks an unused slot.
    Returns [E] float32, differentiable w.r.t. `gates`.
    """
    valid = expert_index >= 0
    flat_expert = torch.where(valid, expert_index, 0).reshape(-1)  # [R*K]
    flat_gates = torch.where(valid, gates, 0.0).reshape(-1)  # [R*K]
    return flat_gates.new_zeros(n_experts).index_add(0, flat_expert, flat_gates)


def assignment_counts(expert_index: Tensor, n_experts: int) -> Tensor:
    """Number of rows routed to each expert (the discrete Load, used where no noise is drawn).

    expert_index: [R, K] int64, -1 marks an unused slot. Returns [E] float32.
    """
    flat = expert_index.reshape(-1)
    flat = flat[flat >= 0]
    return torch.bincount(flat, minlength=n_experts).float()


def prob_in_top_k(
    clean_logits: Tensor,
    noise_std: Tensor,
    noisy_top_values: Tensor,
    in_top_k: Tensor,
    k: int,
) -> Tensor:
    """P(x, i) of App. A, Eq. 9: the probability that expert i stays in the top k when its own
    noise is drawn again and every other component's noise is held fixed:

        P(x, i) = Φ(((x·W_g)_i − kth_excluding(H(x), k, i)) / Softplus((x·W_noise)_i))

    `kth_excluding(H, k, i)` is the k-th largest component of H once component i is removed:
    for an expert inside the top k that is the (k+1)-th largest value of H overall, for an
    expert outside it is the k-th largest. Membership is taken from the top-k indices actually
    selected (not from a value comparison) so ties cannot put an expert on the wrong side.

    clean_logits: [R, E] = x·W_g;  noise_std: [R, E] > 0;
    noisy_top_values: [R, k+1] the k+1 largest noisy logits H(x), descending;
    in_top_k: [R, E] bool, the experts kept for each row.
    Returns [R, E] float32 in [0, 1].
    """
    threshold_if_in = noisy_top_values[:, k : k + 1]  # [R, 1] (k+1)-th largest
    threshold_if_out = noisy_top_values[:, k - 1 : k]  # [R, 1] k-th largest
    threshold = torch.where(in_top_k, threshold_if_in, threshold_if_out)  # [R, E]
    return torch.special.ndtr((clean_logits - threshold) / noise_std)


def batchwise_threshold_loss(
    gate_probs: Tensor, thresholds: Tensor, batchwise_mask: Tensor, n_rows: int | None = None
) -> Tensor:
    """L_batchwise of App. F, Eq. 20, divided by the number of rows:

        (1/|X|) Σ_j Σ_i (M_threshold(x_j, T)_i − M_batchwise(X, m)_{j,i}) · (X_{j,i} − T_i)

    Both masks are constants, and the gate values X are detached, so the loss moves only the
    thresholds T: each T_i is pushed up where the threshold mask keeps a token the batchwise
    mask drops, and down in the opposite case; it is zero when the masks agree.

    gate_probs: [R, E] softmax gate values G_σ(x); thresholds: [E];
    batchwise_mask: [R, E] bool. n_rows: |X|, where the rows are one rank's share of a larger
    batch (the ranks' results then sum to the loss of the batch); None for R.
    Returns a scalar.
    """
    values = gate_probs.detach()
    threshold_mask = (values > thresholds).float()  # [R, E]
    disagreement = threshold_mask - batchwise_mask.float()  # [R, E]
    n_rows = gate_probs.shape[0] if n_rows is None else n_rows
    return (disagreement * (values - thresholds)).sum() / max(n_rows, 1)
