"""Strictly balanced (batchwise) gate of Shazeer et al. 2017, App. F (Eq. 15-20).

Index letters: T tokens, D model width, E experts, K slots per token (variable, padded).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from .losses import assignment_counts, batchwise_threshold_loss, importance
from .parallel import ParallelGroup
from .routing import Router, Routing, balance_losses, check_top_k

if TYPE_CHECKING:
    pass


class BatchwiseRouter(Router):
    """Training: every expert takes exactly its top m = k·|X|/n tokens of the batch (Eq. 18).
    Inference: expert i takes token x when G_σ(x)_i > T_i, with per-expert thresholds T learned
    by the loss of Eq. 20 (Eq. 19). Gates are G_σ(x) masked and renormalised (Eq. 16).

    Choices the paper leaves open, and what this implementation does:
    - The mask ranks the softmax values G_σ(x) = Softmax(x·W_g) (Eq. 15), as Eq. 16 writes the
      mask as a function of G_σ(x).
    - m = floor(k·|X|/n), at least 1 and at most |X|.
    - A token that no expert selected gets all-zero gates (no output from the layer).
    - Ties between exactly equal gate values are broken by torch.topk (implementation-defined).
    - W_g starts from N(0, init_std²), init_std = 1/sqrt(d_model) unless given, not zero: with
      no noise, zero weights would give every token the same gate values and every expert the
      same m tokens.
    - T starts at 1/n, the gate value of a uniform gate.
    - L_batchwise is divided by |X| and moves only T (gate values are detached), reported as
      losses["threshold"] and weighted by w_threshold; in evaluation it is still computed
      against the batch's batchwise mask, so it shows how well T imitates that mask.
    - losses["importance"] (CV² of Σ G) and losses["load"] (CV² of tokens per expert, zero in
      training by construction and without gradient) are reported as for the other routers;
      the paper's MT runs that used this gate set w_importance = w_load = 0.01.
    A token can go to a variable number of experts, so expert_index is padded with -1 to the
    largest count in the batch (of this rank).
    With a ParallelGroup the batch X is that of all ranks: the (detached) gate values of every
    rank are gathered so that each expert takes its top m = k·|X|/n tokens of the global batch,
    and the sums behind Importance, Load, L_batchwise and the extra statistic are summed over
    the ranks.
    Masked (padding) tokens are not part of X: they never take one of an expert's m places,
    |X| counts real tokens only (so m = k·|X|/n does too), and they are left out of Importance,
    Load, L_batchwise and the extra statistic. The gate draws no noise.
    """

    name = "batchwise"

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        k: int,
        *,
        w_importance: float = 0.1,
        w_load: float = 0.1,
        w_threshold: float = 1.0,
        init_std: float | None = None,
    ) -> None:
        super().__init__()
        check_top_k(k, n_experts)
        if init_std is not None and init_std <= 0:
            raise ValueError(f"init_std must be > 0 (or None for 1/sqrt(d_model)), got {init_std}")
        self.d_model, self.n_experts, self.k = d_model, n_experts, k
        self.w_importance, self.w_load, self.w_threshold = w_importance, w_load, w_threshold
        self.init_std = init_std
        std = 1.0 / math.sqrt(d_model) if init_std is None else init_std
        self.w_gate = nn.Parameter(torch.randn(d_model, n_experts) * std)
        self.thresholds = nn.Parameter(torch.full((n_experts,), 1.0 / n_experts))

    def tokens_per_expert(self, n_tokens: int) -> int:
        """m = k·|X|/n of Eq. 18, rounded down, in [1, |X|]."""
        return min(n_tokens, max(1, (self.k * n_tokens) // self.n_experts))

    options: ClassVar[dict[str, str]] = {
        "w_importance": "w_importance",
        "w_load": "w_load",
        "w_threshold": "w_threshold",
        "batchwise_init_std": "init_std",
    }

    def gating_ops_per_token(self) -> int:
        return self.d_model * self.n_experts  # W_g only (Eq. 15): no noise matrix

    def route(self, x: Tensor, group: ParallelGroup, mask: Tensor | None) -> Routing:
        """Returns a Routing whose slots are padded with expert -1."""
        n_tokens = x.shape[0]
        gate_probs = torch.softmax(x @ self.w_gate.to(x.dtype), dim=-1)  # G_σ, [T, E]
        # Eq. 18 ranks the tokens of the whole batch: gather every rank's (constant) values.
        # Masked rows rank as -1, below every gate value (>= 0): they never win a place, and
        # the rows that are >= 0 after the gather count |X|.
        ranked = gate_probs if mask is None else gate_probs.masked_fill(~mask.unsqueeze(-1), -1)
        all_probs, first_row = group.gather_batch(ranked)  # [rows of all ranks, E]
        n_all = all_probs.shape[0] if mask is None else int((all_probs[:, 0] >= 0).sum())  # |X|
        m = self.tokens_per_expert(n_all) if n_all else 0
        top_tokens = all_probs.topk(m, dim=0).indices  # [m, E]
        batchwise_mask = torch.zeros_like(all_probs, dtype=torch.bool)
        batchwise_mask = batchwise_mask.scatter(0, top_tokens, True)  # Eq. 18
        batchwise_mask = batchwise_mask[first_row : first_row + n_tokens]  # [T, E]
        real_probs, real_batchwise = gate_probs, batchwise_mask
        if mask is not None:
            real_probs, real_batchwise = gate_probs[mask], batchwise_mask[mask]  # [T_real, E]
        threshold_loss = group.sum(
            batchwise_threshold_loss(real_probs, self.thresholds, real_batchwise, n_all)
        )
        if self.training:
            selected = batchwise_mask
        else:
            selected = gate_probs > self.thresholds.detach()  # Eq. 19, [T, E]
            if mask is not None:
                selected = selected & mask.unsqueeze(-1)

        selected_probs = gate_probs * selected  # [T, E]
        total = selected_probs.sum(-1, keepdim=True)  # [T, 1]
        # Eq. 16; a token no expert took keeps zero gates (divided by 1, not by ~0, which
        # would inflate a selected gate value that underflowed).
        all_gates = selected_probs / torch.where(total > 0, total, 1.0)  # [T, E]
        # Compact the variable set of experts per token into K padded slots.
        slots = max(1, int(selected.sum(-1).max())) if n_tokens else 1
        scores = torch.where(selected, gate_probs, -1.0)
        top_scores, top_index = scores.topk(slots, dim=-1)  # [T, K]
        valid = top_scores >= 0
        expert_index = torch.where(valid, top_index, -1)
        gates = torch.where(valid, all_gates.gather(-1, top_index), 0.0)  # [T, K]

        importance_per_expert = group.sum(importance(gates, expert_index, self.n_experts))
        load = group.sum(assignment_counts(expert_index, self.n_experts).to(gates.dtype))
        losses, aux_loss = balance_losses(
            importance_per_expert, load, self.w_importance, self.w_load
        )
        losses["threshold"] = threshold_loss
        aux_loss = aux_loss + self.w_threshold * threshold_loss
        unselected = ~selected.any(-1)  # [T]
        if mask is not None:
            unselected = unselected & mask
        without_expert = group.sum(unselected.float().sum())
        extra = {"fraction_tokens_without_expert": without_expert / max(n_all, 1)}
        return Routing(expert_index, gates, importance_per_expert, load, losses, aux_loss, extra)
