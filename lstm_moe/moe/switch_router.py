"""The Switch Transformer router (Fedus et al. 2021, §2.1-2.4): top-1 (or top-2) of a softmax,
the load-balancing loss (Eq. 4-6), the router z-loss (Zoph et al. 2022, ST-MoE Eq. 5), the
router computed in float32 (selective precision) and multiplicative input jitter.

It is a router and nothing else: it returns a Routing, and the core's dispatcher, capacity,
batched experts and expert parallelism do the rest, exactly as for the 2017 gates:

    MoELayer(d_model, n_experts, expert_hidden, k=1, router="switch", capacity_factor=1.25)

It lives in the core beside the 2017 routers so that one mapping (routers.py) builds every
router from a MoEConfig; the `switch` package re-exports it as the Switch Transformer's import
path.

Index letters: T tokens, D model width, E experts, K experts per token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from .initializers import TRUNCATED_STD, reduced_init_std, truncated_normal_
from .losses import assignment_counts, importance
from .parallel import ParallelGroup
from .routing import Router, Routing, check_top_k, mask_slots

if TYPE_CHECKING:
    pass


def load_balancing_loss(routed_fraction: Tensor, router_prob_fraction: Tensor) -> Tensor:
    """N · Σ_i f_i · P_i (Switch Eq. 4), unweighted (the paper's α multiplies it).

    routed_fraction: [E] f_i, the fraction of the batch's (token, choice) pairs routed to expert
    i, counted before capacity drops any (Eq. 5 with k = 1); router_prob_fraction: [E] P_i, the
    mean over tokens of the router probability of expert i (Eq. 6). Both sum to 1, so the loss
    is 1 under uniform routing and N when every token goes to one expert with probability 1.
    Only P carries a gradient (f comes from an argmax). Returns a scalar.
    """
    return routed_fraction.numel() * (routed_fraction * router_prob_fraction).sum()


class SwitchRouter(Router):
    """p(x) = Softmax(x·W_r) (Switch Eq. 1); each token goes to its top-k experts.

    k = 1 is the Switch layer: the gate is p_i(x) of the chosen expert itself (Eq. 2), not
    renormalised, so the task loss reaches W_r through it. k > 1: with renormalize (the
    default) the k probabilities are divided by their sum, as GShard's top-2 gate does; without
    it they are used as they are, as ST-MoE's code does.

    Losses over the batch (of all ranks of a ParallelGroup), reported unweighted by name:
    - "balance": N · Σ f_i · P_i (Eq. 4), weighted by w_balance (α = 1e-2 in the paper). For
      k > 1, f_i counts all k choices and is divided by k, so uniform routing still gives 1 and
      α keeps its meaning. (GShard's top-2 counts first choices only; ST-MoE's code counts all
      k without dividing, k times this loss at uniform routing.)
    - "z": mean over tokens of logsumexp(x·W_r)², the ST-MoE router z-loss, weighted by w_z;
      0 by default as in the Switch paper, ST-MoE uses 1e-3.
    Under a capacity, every token's first choice claims its expert before any second choice
    (Routing.slot_priority), as GShard's top-2 gate does; with k = 1 that is token order. Every
    choice is dispatched: GShard's random dropping of weak second choices is not implemented.

    Training only: the router's input is multiplied by U(1 − jitter_eps, 1 + jitter_eps) noise,
    drawn per element (the Switch code's input jitter; the experts still see the clean input).
    W_r starts from the paper's reduced initialisation (§2.4): a normal truncated at two
    standard deviations whose standard deviation after truncation is sqrt(init_scale / D),
    init_scale = 0.1 (the variance-scaling initialiser the Switch code uses).
    The router computes in float32 even under bf16 autocast (selective precision, §2.4).

    Routing.importance is Σ_x of the gates as dispatched (Eq. 6 of 2017), Routing.load the
    number of pairs routed to each expert before capacity.
    Masked (padding) tokens are routed nowhere and left out of f_i, P_i and the z-loss, whose
    means are over the real tokens. The jitter is drawn for every row, padded ones included: a
    padded batch gives its real tokens other jitter than the same tokens alone.
    """

    name = "switch"

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        k: int = 1,
        *,
        w_balance: float = 1e-2,
        w_z: float = 0.0,
        jitter_eps: float = 1e-2,
        init_scale: float = 0.1,
        renormalize: bool = True,
    ) -> None:
        super().__init__()
        check_top_k(k, n_experts)
        if not 0 <= jitter_eps < 1:
            raise ValueError(f"jitter_eps must be in [0, 1), got {jitter_eps}")
        if init_scale <= 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale}")
        self.d_model, self.n_experts, self.k = d_model, n_experts, k
        self.w_balance, self.w_z, self.jitter_eps = w_balance, w_z, jitter_eps
        self.init_scale, self.renormalize = init_scale, renormalize
        # Standard deviation sqrt(init_scale / D) after the truncation at ±2σ (§2.4); the
        # experts' "trunc_normal" initialisation is the same function.
        self.w_router = nn.Parameter(torch.empty(d_model, n_experts))
        truncated_normal_(self.w_router, reduced_init_std(init_scale, d_model))

    options: ClassVar[dict[str, str]] = {
        "w_balance": "w_balance",
        "w_z": "w_z",
        "jitter_eps": "jitter_eps",
        "switch_init_scale": "init_scale",
        "switch_renormalize": "renormalize",
    }

    def gating_ops_per_token(self) -> int:
        return self.d_model * self.n_experts  # W_r only (Eq. 1)

    def route(self, x: Tensor, group: ParallelGroup, mask: Tensor | None) -> Routing:
        """Returns a Routing with K = k slots per token."""
        n_experts = self.n_experts
        if self.training and self.jitter_eps > 0:
            jitter = 1.0 - self.jitter_eps + 2.0 * self.jitter_eps * torch.rand_like(x)
            x = x * jitter  # [T, D]
        logits = x @ self.w_router.to(x.dtype)  # [T, E]
        probs = torch.softmax(logits, dim=-1)  # p(x), Eq. 1
        top_probs, expert_index = probs.topk(self.k, dim=-1)  # [T, K]
        gates = top_probs
        if self.k > 1 and self.renormalize:
            gates = top_probs / top_probs.sum(-1, keepdim=True)
        squared_lse = torch.logsumexp(logits, dim=-1).pow(2)  # [T], for the z-loss
        if mask is None:
            n_tokens = probs.new_tensor([x.shape[0]])
        else:
            expert_index, gates = mask_slots(expert_index, gates, mask)
            probs = probs.masked_fill(~mask.unsqueeze(-1), 0.0)
            squared_lse = squared_lse.masked_fill(~mask, 0.0)
            n_tokens = mask.sum().to(probs.dtype).unsqueeze(0)  # real tokens

        # One reduction over ranks for every batch sum: [E] Σ p, [E] Σ gates, [E] pairs
        # routed, the Σ of squared logsumexp, and the token count.
        sums = torch.cat(
            [
                probs.sum(0),
                importance(gates, expert_index, n_experts),
                assignment_counts(expert_index, n_experts).to(probs.dtype),
                squared_lse.sum().unsqueeze(0),
                n_tokens,
            ]
        )
        sums = group.sum(sums)
        prob_sum, importance_per_expert, routed, z_sum, total = sums.split(
            [n_experts, n_experts, n_experts, 1, 1]
        )
        total = total.squeeze(0).detach().clamp(min=1)
        losses = {
            "balance": load_balancing_loss(routed.detach() / (total * self.k), prob_sum / total),
            "z": z_sum.squeeze(0) / total,
        }
        aux_loss = self.w_balance * losses["balance"] + self.w_z * losses["z"]
        return Routing(
            expert_index,
            gates,
            importance_per_expert,
            routed.detach(),
            losses,
            aux_loss,
            slot_priority=True,
        )


__all__ = ["TRUNCATED_STD", "SwitchRouter", "load_balancing_loss"]
