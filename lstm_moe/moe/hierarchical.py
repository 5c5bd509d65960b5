"""Hierarchical MoE gate (Shazeer et al. 2017, App. B, Eq. 12-14).

A primary noisy top-k gate picks `k_groups` of `n_groups` groups; inside each picked group a
secondary noisy top-k gate picks `k` of its `experts_per_group` experts. The gate of expert
(g, e) is G_primary(x)_g · G_g(x)_e, and its flat index is g·experts_per_group + e.

Index letters: T tokens, D model width, A groups, B experts per group, K1 = k_groups,
K2 = k, N token-group pairs (T·K1).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from .dispatch import gather_rows, plan_dispatch
from .experts import grouped_matmul
from .losses import importance
from .parallel import ParallelGroup
from .routing import Router, Routing, balance_losses, check_top_k, noisy_top_k_gating

if TYPE_CHECKING:
    from .layer import MoEConfig


class HierarchicalRouter(Router):
    """Two-level noisy top-k gate with the hierarchical Importance_H and Load_H of Eq. 13-14.

    The secondary gates are evaluated only for the tokens routed to their group: the
    (token, group) pairs go through the same dispatcher as tokens to experts, and the A
    secondary gating matrices are applied with one grouped matmul. All gating weights start
    at zero (App. A). With one group the result equals the flat NoisyTopKRouter (same
    routing and random draws; losses equal up to floating-point rounding).
    With a ParallelGroup, the sums over the batch that Eq. 13-14 are built from (Importance,
    Load_primary, the secondary Loads and the group sizes |X^(g)|) are summed over the ranks
    before they are combined, so the losses are those of the global batch.
    Masked (padding) tokens choose no group, so they form no (token, group) pair and are left
    out of every sum above. The primary noise is drawn for every row, padded ones included (a
    padded batch gives its real tokens other noise than the same tokens alone); the secondary
    noise only for the real pairs.
    """

    name = "hierarchical"

    def __init__(
        self,
        d_model: int,
        n_groups: int,
        experts_per_group: int,
        k_groups: int = 2,
        k: int = 2,
        *,
        w_importance: float = 0.1,
        w_load: float = 0.1,
        noise_epsilon: float = 1e-2,
    ) -> None:
        super().__init__()
        check_top_k(k_groups, n_groups, name="k_groups")
        check_top_k(k, experts_per_group, name="k")
        self.d_model, self.n_groups, self.experts_per_group = d_model, n_groups, experts_per_group
        self.n_experts = n_groups * experts_per_group
        self.k_groups, self.k = k_groups, k
        self.w_importance, self.w_load = w_importance, w_load
        self.noise_epsilon = noise_epsilon
        self.w_gate_primary = nn.Parameter(torch.zeros(d_model, n_groups))
        self.w_noise_primary = nn.Parameter(torch.zeros(d_model, n_groups))
        self.w_gate = nn.Parameter(torch.zeros(n_groups, d_model, experts_per_group))
        self.w_noise = nn.Parameter(torch.zeros(n_groups, d_model, experts_per_group))

    @property
    def experts_per_token(self) -> int:
        return self.k_groups * self.k

    @classmethod
    def from_config(cls, config: MoEConfig) -> HierarchicalRouter:
        return cls(
            config.d_model,
            config.n_groups,
            config.n_experts // config.n_groups,
            config.k_groups,
            config.k,
            **cls.option_values(config),
        )

    options: ClassVar[dict[str, str]] = {
        "w_importance": "w_importance",
        "w_load": "w_load",
        "noise_epsilon": "noise_epsilon",
    }

    def config_fields(self) -> dict[str, Any]:
        return {**super().config_fields(), "n_groups": self.n_groups, "k_groups": self.k_groups}

    def gating_ops_per_token(self) -> int:
        # The primary W_g and W_noise, and those of the k_groups secondary gates a token uses.
        primary = 2 * self.d_model * self.n_groups
        return primary + self.k_groups * 2 * self.d_model * self.experts_per_group

    def route(self, x: Tensor, group: ParallelGroup, mask: Tensor | None) -> Routing:
        """Returns a Routing with K1·K2 slots per token over A·B flat experts."""
        n_tokens = x.shape[0]
        primary = noisy_top_k_gating(
            x @ self.w_gate_primary.to(x.dtype),  # [T, A]
            x @ self.w_noise_primary.to(x.dtype) if self.training else None,
            self.k_groups,
            self.noise_epsilon,
            mask,
        )
        primary_load = group.sum(primary.load_per_row.sum(0))  # Load_primary(X), [A]

        # Token-group pairs, group-contiguous; no capacity: every routed token is gated.
        plan = plan_dispatch(primary.index, self.n_groups)
        rows = gather_rows(x, plan)  # [N, D]
        rows_per_group = plan.rows_per_expert  # |X^(g)|, [A]
        secondary = noisy_top_k_gating(
            grouped_matmul(rows, self.w_gate.to(x.dtype), rows_per_group),  # [N, B]
            grouped_matmul(rows, self.w_noise.to(x.dtype), rows_per_group)
            if self.training
            else None,
            self.k,
            self.noise_epsilon,
        )
        group_of_row = torch.repeat_interleave(
            torch.arange(self.n_groups, device=x.device),
            rows_per_group,
            output_size=rows.shape[0],
        )  # [N]

        # Eq. 14: Load_H[g, e] = Load_primary[g] · Load_g(X^(g))[e] / |X^(g)|.
        secondary_load = secondary.load_per_row.new_zeros(self.n_groups, self.experts_per_group)
        secondary_load = secondary_load.index_add(0, group_of_row, secondary.load_per_row)
        secondary_load = group.sum(secondary_load)  # Load_g(X^(g)) over all ranks, [A, B]
        group_size = group.sum(rows_per_group).to(secondary_load.dtype)  # |X^(g)|, [A]
        group_size = group_size.clamp(min=1).unsqueeze(1)  # [A, 1]
        load = (primary_load.unsqueeze(1) * secondary_load / group_size).reshape(-1)  # [A*B]

        # Put each pair's K2 choices back in its (token, primary slot) place.
        pair_gate = primary.gates.reshape(-1).index_select(0, plan.pair_index)  # [N]
        row_gates = pair_gate.unsqueeze(1) * secondary.gates  # [N, K2], Eq. 12
        row_index = group_of_row.unsqueeze(1) * self.experts_per_group + secondary.index
        slots = self.k_groups * self.k
        gates = row_gates.new_zeros(n_tokens * self.k_groups, self.k)
        gates = gates.index_copy(0, plan.pair_index, row_gates).view(n_tokens, slots)
        expert_index = row_index.new_full((n_tokens * self.k_groups, self.k), -1)
        expert_index = expert_index.index_copy(0, plan.pair_index, row_index)
        expert_index = expert_index.view(n_tokens, slots)  # [T, K1*K2]

        importance_per_expert = group.sum(
            importance(gates, expert_index, self.n_experts)
        )  # Eq. 13, [A*B]
        losses, aux_loss = balance_losses(
            importance_per_expert, load, self.w_importance, self.w_load
        )
        return Routing(expert_index, gates, importance_per_expert, load, losses, aux_loss)
