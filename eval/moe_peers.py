"""The designs of other MoE projects, written here for the benchmark: each is a whole layer, its
router included, as those projects' users call it, so eval.bench_moe compares what users run.

  SparseDispatcherMoE  tensor2tensor's SparseDispatcher (Shazeer et al.'s own code), as ported to
      PyTorch by many projects: noisy top-k gating into dense [T, E] gates, one sort of the
      nonzero (token, expert) entries by expert, a split into per-expert blocks, one
      Linear-ReLU-Linear module per expert, index_add of the gated outputs back.
  SwitchLoopMoE  Hugging Face transformers' Switch design: a float32 router, argmax, capacity
      from a cumulative sum over a one-hot [T, E], a loop over the experts that received tokens
      with boolean indexing, dropped tokens passed through unchanged (transformers 4.x; 5.x gives
      them zero), the output scaled by the router probability.
  OneHotSwitchMoE  the Switch layer as Mesh TensorFlow and GShard compute it: one-hot dispatch
      and combine tensors [T, E, C] (C the capacity), every step an einsum over them, the
      experts one batched product over [E, C, D] padded to the capacity.
  DenseFFN  D -> k·H -> D: the FLOPs k experts of width H spend per token.

These are the best practice of each design (empty experts skipped, no per-row Python work), not
copies of those projects' code. Every layer is bias-free, like the paper's experts (App. C.1).
forward(x [T, D]) returns (y [T, D], auxiliary loss).

Index letters: T tokens, D model width, E experts, K experts per token, H expert hidden width,
C capacity (slots per expert).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _expert_modules(n_experts: int, d_model: int, hidden: int) -> nn.ModuleList:
    return nn.ModuleList(
        nn.Sequential(
            nn.Linear(d_model, hidden, bias=False),
            nn.ReLU(),
            nn.Linear(hidden, d_model, bias=False),
        )
        for _ in range(n_experts)
    )


def _cv_squared(values: Tensor) -> Tensor:
    return values.float().var(unbiased=False) / (values.float().mean() ** 2 + 1e-10)


class DenseFFN(nn.Module):
    """D -> k·H -> D, ReLU between: the per-token FLOPs of k experts of width H."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.inner = nn.Linear(d_model, hidden, bias=False)
        self.outer = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.outer(torch.relu(self.inner(x))), x.new_zeros(())


class SparseDispatcherMoE(nn.Module):
    """Noisy top-k gating (Eq. 3-5, with the smooth load estimate of App. A) and the
    SparseDispatcher: sort the nonzero gates by expert, split, one module per expert,
    index_add back."""

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        hidden: int,
        k: int,
        w_importance: float = 0.1,
        w_load: float = 0.1,
        noise_epsilon: float = 1e-2,
    ):
        super().__init__()
        self.n_experts, self.k = n_experts, k
        self.w_importance, self.w_load, self.noise_epsilon = w_importance, w_load, noise_epsilon
        self.w_gate = nn.Parameter(torch.zeros(d_model, n_experts))
        self.w_noise = nn.Parameter(torch.zeros(d_model, n_experts))
        self.experts = _expert_modules(n_experts, d_model, hidden)

    def _gates(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Dense gates [T, E] (zero outside each token's top k) and Load [E]."""
        clean = x @ self.w_gate
        k = self.k
        if not self.training:
            top_values, top_index = clean.topk(k, dim=1)
            gates = torch.zeros_like(clean).scatter(1, top_index, torch.softmax(top_values, 1))
            return gates, (gates > 0).sum(0).float()
        noise_std = F.softplus(x @ self.w_noise) + self.noise_epsilon
        noisy = clean + torch.randn_like(clean) * noise_std
        top_values, top_index = noisy.topk(min(k + 1, self.n_experts), dim=1)
        gates = torch.zeros_like(clean).scatter(
            1, top_index[:, :k], torch.softmax(top_values[:, :k], 1)
        )
        if k == self.n_experts:
            return gates, (gates > 0).sum(0).float()
        # P(noisy value stays in the top k), Eq. 9: against the (k+1)-th value for experts in
        # the top k, against the k-th for the others.
        threshold_in = top_values[:, k : k + 1]
        threshold_out = top_values[:, k - 1 : k]
        is_in = noisy > threshold_in
        normal = torch.distributions.Normal(0.0, 1.0)
        prob_in = normal.cdf((clean - threshold_in) / noise_std)
        prob_out = normal.cdf((clean - threshold_out) / noise_std)
        return gates, torch.where(is_in, prob_in, prob_out).sum(0)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        gates, load = self._gates(x)
        aux_loss = self.w_importance * _cv_squared(gates.sum(0)) + self.w_load * _cv_squared(load)
        # SparseDispatcher: the nonzero (token, expert) entries, sorted by expert.
        nonzero = torch.nonzero(gates)  # [N, 2]
        expert_sorted, order = nonzero[:, 1].sort(stable=True)
        token_index = nonzero[order, 0]  # [N]
        nonzero_gates = gates[token_index, expert_sorted].unsqueeze(1)  # [N, 1]
        part_sizes = torch.bincount(expert_sorted, minlength=self.n_experts).tolist()
        blocks = x.index_select(0, token_index).split(part_sizes)
        outputs = [
            expert(block)
            for expert, block, n in zip(self.experts, blocks, part_sizes, strict=True)
            if n
        ]
        stitched = torch.cat(outputs) * nonzero_gates  # [N, D]
        return x.new_zeros(x.shape).index_add(0, token_index, stitched), aux_loss


class SwitchLoopMoE(nn.Module):
    """Top-1 Switch routing with a capacity, one module per expert in a loop over the experts
    that received tokens."""

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        hidden: int,
        capacity_factor: float = 1.25,
        jitter_eps: float = 1e-2,
        w_balance: float = 1e-2,
    ):
        super().__init__()
        self.n_experts, self.capacity_factor = n_experts, capacity_factor
        self.jitter_eps, self.w_balance = jitter_eps, w_balance
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.experts = _expert_modules(n_experts, d_model, hidden)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        n_tokens = x.shape[0]
        router_in = x.float()
        if self.training and self.jitter_eps > 0:
            router_in = router_in * torch.empty_like(router_in).uniform_(
                1 - self.jitter_eps, 1 + self.jitter_eps
            )
        # The router's weight in float32 too (transformers casts its classifier to the router
        # dtype), so that a model cast to bf16 keeps a float32 router.
        logits = F.linear(router_in, self.router.weight.to(router_in.dtype))  # [T, E]
        probs = torch.softmax(logits, dim=-1)  # [T, E]
        expert_index = probs.argmax(-1)  # [T]
        one_hot = F.one_hot(expert_index, self.n_experts)  # [T, E]
        capacity = math.ceil(self.capacity_factor * n_tokens / self.n_experts)
        kept = one_hot * (one_hot.cumsum(0) <= capacity)  # [T, E]
        aux_loss = self.w_balance * self.n_experts * (one_hot.float().mean(0) * probs.mean(0)).sum()
        gate = probs.max(-1).values.unsqueeze(1)  # [T, 1]
        next_states = x.clone()  # dropped tokens pass through unchanged
        busy = kept.sum(0).nonzero().flatten().tolist()
        for expert_id in busy:
            rows = kept[:, expert_id].bool()
            next_states[rows] = self.experts[expert_id](x[rows]).to(next_states.dtype)
        return gate.to(x.dtype) * next_states, aux_loss


class OneHotSwitchMoE(nn.Module):
    """Top-1 Switch routing with a capacity, dispatched by dense one-hot tensors: a token's
    slot in its expert is the running count of earlier tokens routed there (a cumulative sum),
    tokens past the capacity are dropped (output zero, the residual carries them), and
    dispatch, experts and combine are einsums. Its cost does not depend on which tokens go
    where: the dispatch and combine contractions cost T·E·C·D each, cf·T²·D whatever E, and
    every expert computes all C of its slots, filled or not. Router in float32, experts as
    [E, D, H] and [E, H, D] tensors."""

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        hidden: int,
        capacity_factor: float = 1.25,
        jitter_eps: float = 1e-2,
        w_balance: float = 1e-2,
    ):
        super().__init__()
        self.n_experts, self.capacity_factor = n_experts, capacity_factor
        self.jitter_eps, self.w_balance = jitter_eps, w_balance
        self.w_router = nn.Parameter(torch.empty(d_model, n_experts))
        self.w_in = nn.Parameter(torch.empty(n_experts, d_model, hidden))
        self.w_out = nn.Parameter(torch.empty(n_experts, hidden, d_model))
        # Each like an nn.Linear of its fan-in (the other designs' experts).
        for weight, fan_in in (
            (self.w_router, d_model),
            (self.w_in, d_model),
            (self.w_out, hidden),
        ):
            nn.init.uniform_(weight, -(fan_in**-0.5), fan_in**-0.5)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        n_tokens, n_experts = x.shape[0], self.n_experts
        router_in = x.float()
        if self.training and self.jitter_eps > 0:
            router_in = router_in * torch.empty_like(router_in).uniform_(
                1 - self.jitter_eps, 1 + self.jitter_eps
            )
        probs = torch.softmax(router_in @ self.w_router.float(), dim=-1)  # [T, E]
        gate, expert_index = probs.max(-1)  # [T]
        one_hot = F.one_hot(expert_index, n_experts).to(probs.dtype)  # [T, E]
        capacity = math.ceil(self.capacity_factor * n_tokens / n_experts)
        # Slot of each token in its expert: how many tokens before it chose the same one.
        slot = ((one_hot.cumsum(0) - 1.0) * one_hot).sum(-1).long()  # [T]
        kept = (slot < capacity).to(probs.dtype)  # [T]
        slot_one_hot = F.one_hot(slot.clamp(max=capacity - 1), capacity).to(probs.dtype)  # [T, C]
        dispatch = (one_hot * kept[:, None])[:, :, None] * slot_one_hot[:, None, :]  # [T, E, C]
        combine = dispatch * gate[:, None, None]  # [T, E, C], the gate of the kept tokens
        aux_loss = self.w_balance * n_experts * (one_hot.mean(0) * probs.mean(0)).sum()
        dispatch, combine = dispatch.to(x.dtype), combine.to(x.dtype)
        expert_in = torch.einsum("tec,td->ecd", dispatch, x)  # [E, C, D]
        hidden = torch.relu(torch.einsum("ecd,edh->ech", expert_in, self.w_in))  # [E, C, H]
        expert_out = torch.einsum("ech,ehd->ecd", hidden, self.w_out)  # [E, C, D]
        return torch.einsum("tec,ecd->td", combine, expert_out), aux_loss  # [T, D]
