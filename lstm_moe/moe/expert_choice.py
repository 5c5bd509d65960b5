"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing",
arXiv 2202.09368, §3.1): instead of every token choosing its top-k experts, every expert
chooses its top tokens of the batch.

    S = Softmax(X·W_g) over the experts           [n, E]   token-to-expert affinity
    each expert e takes the c·n/E tokens with the largest S[:, e]     (c the capacity factor)
    y_t = Σ_{e that took t} S[t, e] · E_e(x_t)

Every expert computes exactly its capacity, so the load is balanced by construction and there
is no auxiliary loss; a token may be taken by no expert (its layer output is 0, the residual
carries it) or by several. It is the sibling of the strictly balanced gate of Shazeer et al.
2017, App. F (batchwise.py), whose experts also take their top m = k·|X|/n tokens of the batch
in training; expert choice does so in evaluation too, with no learned thresholds.

Because a token's experts depend on the other tokens of the batch, a causal model would see
future tokens through it (Zhou et al. §6 name this limit for auto-regressive decoding); the
Transformer configs therefore refuse it in causal stacks unless asked (sees_whole_batch).

The choice is handed to the dispatcher in the expert-major layout (dispatch.ExpertChoice):
the [E, capacity] picks, not a token-major [T, K] table that would have to be padded to the
most-chosen token's count (up to E).

Index letters: T tokens of this rank, n tokens of the batch of all ranks, D model width,
E experts, C tokens per expert (the capacity).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from .dispatch import ExpertChoice, expert_capacity
from .initializers import reduced_init_std, truncated_normal_
from .losses import importance
from .parallel import ParallelGroup
from .routing import Router, Routing

# Zhou et al. 2022 use c = 2 (EC-CF2) as their main setting: on average two experts per
# token, the compute of top-2 token choice.
DEFAULT_CAPACITY_FACTOR = 2.0


class ExpertChoiceRouter(Router):
    """Each expert takes its top C = ceil(c·n/E) tokens of the batch (at most n) by
    S = Softmax(X·W_g), gated by S itself (Zhou et al. 2022, Eq. 1-2, not renormalised).

    capacity_factor: c in training, None for DEFAULT_CAPACITY_FACTOR (2, the paper's EC-CF2);
    eval_capacity_factor: c in evaluation mode, None for the training one. k is not used by
    the choice (C sets the compute); it is kept because MoEConfig always carries one.
    n counts the real tokens of the batch of all ranks: under expert parallelism the (detached)
    affinities of every rank are gathered and each expert chooses over the global batch, as
    one process does on the concatenated batch; each rank then dispatches the picks that fall
    on its own tokens. Masked (padding) tokens are never chosen and do not count in n.
    Ties between equal affinities are broken by torch.topk (implementation-defined); W_g starts
    from the Switch router's reduced initialisation (a truncated normal of standard deviation
    sqrt(init_scale / D)), not from zero, so that the experts' first choices differ.

    Losses: none (losses is empty, aux_loss 0). Routing.importance is Σ of the gates each
    expert took, Routing.load the tokens it took (C each once n ≥ C); extra_stats holds
    "fraction_tokens_without_expert" and "experts_per_token_max".
    """

    name = "expert_choice"
    sees_whole_batch = True

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        k: int = 1,
        *,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
        init_scale: float = 0.1,
    ) -> None:
        super().__init__()
        if n_experts < 1:
            raise ValueError(f"n_experts must be >= 1, got {n_experts}")
        for name, value in (
            ("capacity_factor", capacity_factor),
            ("eval_capacity_factor", eval_capacity_factor),
        ):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 (or None for the default), got {value}")
        if init_scale <= 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale}")
        self.d_model, self.n_experts, self.k = d_model, n_experts, k
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.init_scale = init_scale
        self.w_gate = nn.Parameter(torch.empty(d_model, n_experts))
        truncated_normal_(self.w_gate, reduced_init_std(init_scale, d_model))

    options: ClassVar[dict[str, str]] = {
        "capacity_factor": "capacity_factor",
        "eval_capacity_factor": "eval_capacity_factor",
        "switch_init_scale": "init_scale",
    }

    def current_capacity_factor(self) -> float:
        """c for the current mode (training or evaluation)."""
        if not self.training and self.eval_capacity_factor is not None:
            return self.eval_capacity_factor
        if self.capacity_factor is None:
            return DEFAULT_CAPACITY_FACTOR
        return self.capacity_factor

    def tokens_per_expert(self, n_tokens: int) -> int:
        """C = ceil(c·n/E), at least 1 and at most n (0 for an empty batch)."""
        if n_tokens == 0:
            return 0
        capacity = expert_capacity(n_tokens, 1, self.n_experts, self.current_capacity_factor())
        return min(n_tokens, capacity)

    def mean_experts_per_token(self) -> float:
        """c: the experts a token takes on average (what its compute is matched by)."""
        return self.current_capacity_factor()

    def gating_ops_per_token(self) -> int:
        return self.d_model * self.n_experts  # W_g only

    def route(self, x: Tensor, group: ParallelGroup, mask: Tensor | None) -> Routing:
        """Returns a Routing in the expert-major layout (Routing.choice)."""
        n_local, n_experts = x.shape[0], self.n_experts
        affinity = torch.softmax(x @ self.w_gate.to(x.dtype), dim=-1)  # S, [T, E]
        # Masked rows rank as -1, below every affinity (>= 0): never chosen; the rows >= 0
        # after the gather are the real tokens n.
        ranked = affinity if mask is None else affinity.masked_fill(~mask.unsqueeze(-1), -1.0)
        all_affinity, first_row = group.gather_batch(ranked)  # [n rows of all ranks, E]
        n_real = all_affinity.shape[0] if mask is None else int((all_affinity[:, 0] >= 0).sum())
        capacity = self.tokens_per_expert(n_real)
        chosen_rows = all_affinity.topk(capacity, dim=0).indices  # [C, E], global rows
        chosen = torch.zeros_like(all_affinity, dtype=torch.bool)
        chosen = chosen.scatter(0, chosen_rows, True)[first_row : first_row + n_local]  # [T, E]

        # This rank's picks, expert-major: nonzero of [E, T] lists them by expert, then by
        # token ascending (the order plan_choice needs).
        expert_of_pair, token_of_pair = chosen.t().nonzero(as_tuple=True)  # [N], [N]
        gates = affinity[token_of_pair, expert_of_pair]  # [N], differentiable
        rows = torch.bincount(expert_of_pair, minlength=n_experts)  # [E]
        choice = ExpertChoice(token_of_pair, gates, rows)

        experts_taken = chosen.sum(-1)  # [T]
        without_expert = experts_taken == 0
        if mask is not None:
            without_expert = without_expert & mask
        sums = torch.cat(
            [
                importance(gates, expert_of_pair, n_experts),
                rows.to(gates.dtype),
                without_expert.sum().to(gates.dtype).unsqueeze(0),
            ]
        )
        importance_per_expert, load, n_without = group.sum(sums).split([n_experts, n_experts, 1])
        most = experts_taken.max() if n_local else experts_taken.new_zeros(())
        most = group.gather(most).max()
        extra = {
            "fraction_tokens_without_expert": n_without.squeeze(0).detach() / max(n_real, 1),
            "experts_per_token_max": most.to(gates.dtype),
        }
        return Routing(
            None,
            None,
            importance_per_expert,
            load.detach(),
            {},
            gates.new_zeros(()),
            extra,
            choice=choice,
        )


__all__ = ["DEFAULT_CAPACITY_FACTOR", "ExpertChoiceRouter"]
