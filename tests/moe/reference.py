"""Slow, obviously-correct reference implementations: one token, one expert at a time,
following the paper's equations literally. Used only by the tests.

They read the fast modules' parameters and draw their noise in the documented order
(one randn of [T, E] for a gate; for the hierarchical gate, [T, A] then one [N, B] for the
token-group pairs ordered by group, then token), so with the same seed both see the same noise.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# The dtype the fast layer computes its router in (its noise is drawn in that dtype).
NOISE_DTYPE = [torch.float32]


def phi(z: Tensor) -> Tensor:
    """Standard normal CDF, written from erf."""
    return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))


def cv_squared(values: Tensor) -> Tensor:
    n = values.numel()
    if n <= 1:
        return values.sum() * 0.0
    mean = sum(values[i] for i in range(n)) / n
    variance = sum((values[i] - mean) ** 2 for i in range(n)) / n
    return variance / (mean**2 + 1e-10)


def kth_excluding(h: Tensor, k: int, i: int) -> Tensor:
    """The k-th largest entry of h once entry i is removed (App. A)."""
    others = torch.cat([h[:i], h[i + 1 :]])
    return torch.sort(others, descending=True).values[k - 1]


def noisy_top_k_one_token(
    clean: Tensor, noise: Tensor | None, raw_noise: Tensor | None, k: int, eps: float
):
    """Eq. 3-5 and 9 for one token. Returns (kept experts, gates, P(x, ·) or 0/1 kept)."""
    n = clean.numel()
    if noise is None or k == n:
        h = clean
        kept = [int(i) for i in torch.sort(h, descending=True, stable=True).indices[:k]]
        gates = torch.softmax(torch.stack([h[i] for i in kept]), 0)
        load = torch.stack([clean.new_tensor(1.0 if i in kept else 0.0) for i in range(n)])
        return kept, gates, load
    std = torch.nn.functional.softplus(raw_noise) + eps
    h = clean + noise * std
    kept = [int(i) for i in torch.sort(h, descending=True, stable=True).indices[:k]]
    gates = torch.softmax(torch.stack([h[i] for i in kept]), 0)
    load = torch.stack([phi((clean[i] - kth_excluding(h, k, i)) / std[i]) for i in range(n)])
    return kept, gates, load


def noisy_top_k_routing(
    x: Tensor, w_gate: Tensor, w_noise: Tensor, k: int, eps: float, training: bool
):
    """Per token: (list of expert lists, list of gate vectors), Importance, Load."""
    n_tokens, n_experts = x.shape[0], w_gate.shape[1]
    draw = training and k < n_experts
    noise = torch.randn(n_tokens, n_experts, dtype=NOISE_DTYPE[0]).to(x.dtype) if draw else None
    experts, gates = [], []
    importance = x.new_zeros(n_experts)
    load = x.new_zeros(n_experts)
    for t in range(n_tokens):
        kept, g, p = noisy_top_k_one_token(
            x[t] @ w_gate,
            None if noise is None else noise[t],
            x[t] @ w_noise if noise is not None else None,
            k,
            eps,
        )
        experts.append(kept)
        gates.append(g)
        for slot, e in enumerate(kept):
            importance = (
                importance + torch.nn.functional.one_hot(torch.tensor(e), n_experts) * g[slot]
            )
        load = load + p
    return experts, gates, importance, load


def hierarchical_routing(x: Tensor, router, training: bool):
    """App. B with Eq. 13-14, group by group."""
    n_tokens = x.shape[0]
    a, b = router.n_groups, router.experts_per_group
    k1, k2, eps = router.k_groups, router.k, router.noise_epsilon
    w_gp, w_np = router.w_gate_primary.to(x.dtype), router.w_noise_primary.to(x.dtype)
    groups, primary_gates, _, primary_load = noisy_top_k_routing(x, w_gp, w_np, k1, eps, training)
    members = [[t for t in range(n_tokens) if g in groups[t]] for g in range(a)]  # X^(g)
    n_rows = sum(len(m) for m in members)
    draw = training and k2 < b
    noise = torch.randn(n_rows, b, dtype=NOISE_DTYPE[0]).to(x.dtype) if draw else None
    experts = [[] for _ in range(n_tokens)]
    gates = [[] for _ in range(n_tokens)]
    importance = x.new_zeros(a * b)
    load = x.new_zeros(a * b)
    row = 0
    for g in range(a):
        secondary_load = x.new_zeros(b)
        for t in members[g]:
            kept, sg, p = noisy_top_k_one_token(
                x[t] @ router.w_gate[g].to(x.dtype),
                None if noise is None else noise[row],
                x[t] @ router.w_noise[g].to(x.dtype) if noise is not None else None,
                k2,
                eps,
            )
            row += 1
            pg = primary_gates[t][groups[t].index(g)]
            for slot, e in enumerate(kept):
                experts[t].append(g * b + e)
                gates[t].append(pg * sg[slot])
                importance = importance + torch.nn.functional.one_hot(
                    torch.tensor(g * b + e), a * b
                ) * (pg * sg[slot])
            secondary_load = secondary_load + p
        if members[g]:
            part = primary_load[g] * secondary_load / len(members[g])
            load = load + torch.cat([x.new_zeros(g * b), part, x.new_zeros((a - g - 1) * b)])
    return experts, [torch.stack(g) for g in gates], importance, load


def batchwise_routing(x: Tensor, router, training: bool):
    """App. F, expert by expert."""
    n_tokens, n_experts = x.shape[0], router.n_experts
    probs = torch.softmax(x @ router.w_gate.to(x.dtype), dim=-1)
    values = probs.detach()
    m = min(n_tokens, max(1, router.k * n_tokens // n_experts))
    chosen = [[False] * n_experts for _ in range(n_tokens)]
    for i in range(n_experts):
        column = [(float(values[t, i]), t) for t in range(n_tokens)]
        batch_top = sorted(column, key=lambda pair: -pair[0])[:m]
        for _, t in batch_top:
            chosen[t][i] = True
    batch_mask = [row[:] for row in chosen]
    if not training:
        chosen = [
            [bool(values[t, i] > router.thresholds[i]) for i in range(n_experts)]
            for t in range(n_tokens)
        ]
    experts, gates = [], []
    importance = x.new_zeros(n_experts)
    for t in range(n_tokens):
        kept = [i for i in range(n_experts) if chosen[t][i]]
        kept.sort(key=lambda i: -float(values[t, i]))
        total = sum(probs[t, i] for i in kept) if kept else None
        g = [probs[t, i] / total for i in kept]
        experts.append(kept)
        gates.append(torch.stack(g) if g else x.new_zeros(0))
        for i, gi in zip(kept, g, strict=True):
            importance = importance + torch.nn.functional.one_hot(torch.tensor(i), n_experts) * gi
    load = x.new_tensor([sum(chosen[t][i] for t in range(n_tokens)) for i in range(n_experts)])
    threshold_loss = x.new_zeros(())
    for t in range(n_tokens):
        for i in range(n_experts):
            v, th = probs[t, i].detach(), router.thresholds[i]
            threshold_loss = threshold_loss + (float(v > th) - float(batch_mask[t][i])) * (v - th)
    return experts, gates, importance, load, threshold_loss / n_tokens


def expert_forward(experts, e: int, x: Tensor) -> Tensor:
    """Expert e on one token x: [D]. ReLU(x·W_in + b_in)·W_out + b_out (App. C.1), or for
    GEGLU experts (GELU(x·W_gate) ⊙ x·W_in)·W_out (Shazeer 2020, §2)."""
    h = x @ experts.w_in[e].to(x.dtype)
    if experts.b_in is not None:
        h = h + experts.b_in[e].to(x.dtype)
    if getattr(experts, "w_gate", None) is not None:
        gelu = torch.nn.functional.gelu(x @ experts.w_gate[e].to(x.dtype))
        y = (gelu * h) @ experts.w_out[e].to(x.dtype)
    else:
        y = torch.relu(h) @ experts.w_out[e].to(x.dtype)
    if experts.b_out is not None:
        y = y + experts.b_out[e].to(x.dtype)
    return y


def moe_forward(layer, x: Tensor):
    """The whole layer, token by token. Returns (output [T, D], aux_loss, losses dict)."""
    cfg = layer.config
    router = layer.router
    training = layer.training
    if cfg.router == "noisy_topk":
        w_g, w_n = router.w_gate.to(x.dtype), router.w_noise.to(x.dtype)
        experts, gates, importance, load = noisy_top_k_routing(
            x, w_g, w_n, cfg.k, cfg.noise_epsilon, training
        )
        extra = {}
    elif cfg.router == "hierarchical":
        experts, gates, importance, load = hierarchical_routing(x, router, training)
        extra = {}
    else:
        experts, gates, importance, load, threshold = batchwise_routing(x, router, training)
        extra = {"threshold": threshold}
    capacity = None
    if cfg.capacity_factor is not None:
        capacity = max(
            1, math.ceil(cfg.capacity_factor * x.shape[0] * cfg.experts_per_token / cfg.n_experts)
        )
    taken = [0] * cfg.n_experts
    outputs = []
    # Capacity goes to tokens in batch order, and within a token to its slots in order.
    for t in range(x.shape[0]):
        y = x.new_zeros(x.shape[1])
        for slot, e in enumerate(experts[t]):
            if capacity is not None and taken[e] >= capacity:
                continue
            taken[e] += 1
            y = y + gates[t][slot] * expert_forward(layer.experts, e, x[t])
        outputs.append(y)
    losses = {"importance": cv_squared(importance), "load": cv_squared(load), **extra}
    aux = cfg.w_importance * losses["importance"] + cfg.w_load * losses["load"]
    if "threshold" in extra:
        aux = aux + cfg.w_threshold * extra["threshold"]
    return torch.stack(outputs), aux, losses
