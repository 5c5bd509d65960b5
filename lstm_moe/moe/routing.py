"""The routing result every router returns, the base class every router derives from, and the
noisy top-k gate (Shazeer et al. 2017, §2.1 Eq. 3-5 and App. A Eq. 6-11).

Index letters: T tokens, D model width, E experts, K experts kept per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dispatch import ExpertChoice
from .losses import assignment_counts, cv_squared, importance, prob_in_top_k
from .parallel import ParallelGroup

if TYPE_CHECKING:
    from .layer import MoEConfig


@dataclass
class Routing:
    """Which experts each token goes to, with what weight, and the router's auxiliary losses.

    Under expert parallelism expert_index and gates are this rank's tokens; importance, load,
    the losses and extra_stats are over the batch of all ranks, as the paper defines them.

    expert_index: [T, K] int64; -1 marks an unused slot (routers with a variable number of
        experts per token, such as the batchwise gate, pad with it).
    gates: [T, K] float32, 0 in unused slots.
    importance: [E] float32, Σ_x G(x) (Eq. 6 or 13).
    load: [E] float32, the smooth Load estimate (Eq. 10 or 14) where noise is drawn, else the
        number of tokens assigned to each expert.
    losses: unweighted auxiliary losses by name ("importance", "load", ...).
    aux_loss: their weighted sum, the term added to the training objective.
    slot_priority: under a capacity, every token's first choice claims its expert before any
        second choice (GShard's top-2 policy); False keeps pairs in token order (plan_dispatch).
    choice: the expert-major layout (dispatch.ExpertChoice), from routers where each expert
        picks its tokens (expert choice); expert_index and gates are then None. Its pairs are
        dispatched as they are: the layer applies no capacity to them.
    """

    expert_index: Tensor | None
    gates: Tensor | None
    importance: Tensor
    load: Tensor
    losses: dict[str, Tensor]
    aux_loss: Tensor
    extra_stats: dict[str, Tensor] = field(default_factory=dict)
    slot_priority: bool = False
    choice: ExpertChoice | None = None

    def pairs(self) -> tuple[Tensor, Tensor, Tensor]:
        """Every routed (token, expert) pair in either layout: token [P], expert [P], gate [P]
        (before any capacity; unused slots left out), for analyses that read the routing."""
        if self.choice is not None:
            return self.choice.token_index, self.choice.expert_index(), self.choice.gates
        n_tokens, slots = self.expert_index.shape
        token = torch.arange(n_tokens, device=self.expert_index.device).repeat_interleave(slots)
        used = self.expert_index.reshape(-1) >= 0  # [T*K]
        return token[used], self.expert_index.reshape(-1)[used], self.gates.reshape(-1)[used]


@dataclass
class TopKGating:
    """Row-wise result of noisy top-k gating (shared by the flat and hierarchical routers).

    index: [R, K] int64; gates: [R, K] float32 (softmax over the kept values only);
    load_per_row: [R, E] float32, P(x, i) of Eq. 9 where noise is drawn, else the 0/1
    indicator of being kept, so that summing over rows gives Load (Eq. 10).
    """

    index: Tensor
    gates: Tensor
    load_per_row: Tensor


def mask_slots(expert_index: Tensor, gates: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The routing of masked-out rows emptied: expert -1 and gate 0 in every slot.

    expert_index, gates: [R, K]; mask: [R] bool, True for a real row. The gates of masked rows
    get no gradient.
    """
    keep = mask.unsqueeze(-1)  # [R, 1]
    return expert_index.masked_fill(~keep, -1), gates.masked_fill(~keep, 0.0)


def noisy_top_k_gating(
    clean_logits: Tensor,
    raw_noise_logits: Tensor | None,
    k: int,
    noise_epsilon: float,
    mask: Tensor | None = None,
) -> TopKGating:
    """KeepTopK then Softmax (Eq. 3 and 5) over H(x) of Eq. 4.

    clean_logits: [R, E] float32 = x·W_g. raw_noise_logits: [R, E] = x·W_noise, or None to
    draw no noise (evaluation, or k equal to E where nothing is selected). The noise scale is
    Softplus(x·W_noise) + noise_epsilon; the authors' released code adds noise_epsilon = 1e-2
    so the division in Eq. 9 can never be by zero; noise_epsilon = 0 gives Eq. 4 exactly, at
    the risk of a zero scale (and NaN gradients) where Softplus underflows.
    mask: [R] bool, True for a real row, or None (all real). A masked row keeps no expert
    (index -1, gate 0) and adds nothing to Load; noise is still drawn for it (one draw of
    [R, E]), so which noise a real row gets depends on the rows around it.
    """
    n_experts = clean_logits.shape[-1]
    if raw_noise_logits is None or k == n_experts:
        top_values, top_index = clean_logits.topk(k, dim=-1)  # [R, K]
        kept = torch.zeros_like(clean_logits).scatter(-1, top_index, 1.0)  # [R, E]
        gating = TopKGating(top_index, torch.softmax(top_values, dim=-1), kept)
    else:
        gating = _noisy_gating(clean_logits, raw_noise_logits, k, noise_epsilon)
    if mask is None:
        return gating
    index, gates = mask_slots(gating.index, gating.gates, mask)
    return TopKGating(index, gates, gating.load_per_row.masked_fill(~mask.unsqueeze(-1), 0.0))


def _noisy_gating(
    clean_logits: Tensor, raw_noise_logits: Tensor, k: int, noise_epsilon: float
) -> TopKGating:
    """H(x) with the noise of Eq. 4 drawn, its top k, and the smooth P(x, i) of Eq. 9."""
    noise_std = F.softplus(raw_noise_logits) + noise_epsilon  # [R, E]
    noisy_logits = clean_logits + torch.randn_like(clean_logits) * noise_std  # H(x), [R, E]
    # The (k+1)-th value is the threshold of Eq. 9 for experts inside the top k.
    top_values, top_index = noisy_logits.topk(k + 1, dim=-1)  # [R, K+1], descending
    kept_index = top_index[:, :k]  # [R, K]
    gates = torch.softmax(top_values[:, :k], dim=-1)  # softmax after KeepTopK, Eq. 3
    in_top_k = torch.zeros_like(clean_logits, dtype=torch.bool).scatter(-1, kept_index, True)
    load_per_row = prob_in_top_k(clean_logits, noise_std, top_values, in_top_k, k)  # [R, E]
    return TopKGating(kept_index, gates, load_per_row)


def balance_losses(
    importance_per_expert: Tensor, load_per_expert: Tensor, w_importance: float, w_load: float
) -> tuple[dict[str, Tensor], Tensor]:
    """CV²(Importance) and CV²(Load) (Eq. 7 and 11), unweighted by name and weighted summed."""
    losses = {
        "importance": cv_squared(importance_per_expert),
        "load": cv_squared(load_per_expert),
    }
    return losses, w_importance * losses["importance"] + w_load * losses["load"]


def router_precision(x: Tensor) -> Tensor:
    """The router's input in float32, or wider if it already is (float64 for gradcheck)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def check_top_k(k: int, n_experts: int, name: str = "k") -> None:
    if n_experts < 1:
        raise ValueError(f"n_experts must be >= 1, got {n_experts}")
    if not 1 <= k <= n_experts:
        raise ValueError(f"{name} must be in [1, {n_experts}] (the number of experts), got {k}")


class Router(nn.Module):
    """What every router shares: x[T, D] (this rank's tokens) -> Routing, the router's math in
    float32 even under autocast (Switch Transformer's selective precision), and its description
    as MoEConfig fields.

    `forward(x, group=None, mask=None)` does the part every router needs and then calls the
    subclass's `route`: group None is this process alone; the input is taken out of autocast
    and into float32 (router_precision); with a mask ([T] bool, True for a real token), masked
    rows of x are replaced by zeros, so nothing in a padded row (not even NaN) reaches the
    router's sums or gradients. `route` must give masked tokens no expert (index -1, gate 0) and
    leave them out of every sum over the batch.

    A subclass sets `name` (its MoEConfig.router name) and defines `route`, `from_config` (build
    from a MoEConfig), `config_fields` (the MoEConfig fields that rebuild it: from_config of a
    config holding them gives the same router) and `gating_ops_per_token`. It keeps d_model,
    n_experts and k as attributes.
    """

    name: ClassVar[str]
    # True for a router whose choice for one token depends on the other tokens of the batch
    # by design (expert choice ranks the whole batch's tokens for each expert): a causal
    # model would see future tokens through it (Zhou et al. 2022, §6).
    sees_whole_batch: ClassVar[bool] = False
    d_model: int
    n_experts: int
    k: int

    @property
    def experts_per_token(self) -> int:
        """Routing slots a token fills (what sizes the capacity)."""
        return self.k

    def forward(
        self, x: Tensor, group: ParallelGroup | None = None, mask: Tensor | None = None
    ) -> Routing:
        """x: [T, D], this rank's tokens; mask: [T] bool or None (every token real)."""
        group = ParallelGroup() if group is None else group
        if mask is not None and (mask.dtype != torch.bool or mask.shape != x.shape[:1]):
            raise ValueError(
                f"mask must be bool of shape {tuple(x.shape[:1])}, got {mask.dtype} "
                f"{tuple(mask.shape)}"
            )
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = router_precision(x)
            if mask is not None:
                x = x.masked_fill(~mask.unsqueeze(-1), 0.0)  # [T, D]
            return self.route(x, group, mask)

    def route(self, x: Tensor, group: ParallelGroup, mask: Tensor | None) -> Routing:
        """x: [T, D] float32 (or float64), outside autocast, zero in masked rows."""
        raise NotImplementedError

    # The router's options: MoEConfig field -> the constructor keyword, which is also the
    # attribute holding it. from_config and config_fields both read this one table.
    options: ClassVar[dict[str, str]] = {}

    @classmethod
    def option_values(cls, config: MoEConfig) -> dict[str, Any]:
        """The constructor keywords of a config's options."""
        return {keyword: getattr(config, name) for name, keyword in cls.options.items()}

    @classmethod
    def from_config(cls, config: MoEConfig) -> Router:
        """Routers built as (d_model, n_experts, k, **options); others override this."""
        return cls(config.d_model, config.n_experts, config.k, **cls.option_values(config))

    def config_fields(self) -> dict[str, Any]:
        """The MoEConfig fields that describe this router: its name, n_experts, k and options."""
        own = {name: getattr(self, keyword) for name, keyword in self.options.items()}
        return {"router": self.name, "n_experts": self.n_experts, "k": self.k, **own}

    def gating_ops_per_token(self) -> int:
        """Multiply-adds of the gating network per token (Table 7 counts every gating matrix
        a token is multiplied by, W_noise included)."""
        raise NotImplementedError


class NoisyTopKRouter(Router):
    """Noisy top-k gating (Eq. 3-5) with the importance and load losses of App. A.

    Training: H(x) = x·W_g + N(0, 1)·(Softplus(x·W_noise) + noise_epsilon); the k largest
    entries are kept and softmaxed; Load uses the smooth estimator of Eq. 9-10.
    Evaluation (`.eval()`): no noise is drawn, so routing is deterministic, H(x) = x·W_g, and
    Load is the number of tokens assigned to each expert. When k equals the number of experts
    nothing is selected, so no noise is drawn either.
    W_g and W_noise start at zero (App. A): routing starts uniform at random, with equal load.
    The gate runs in float32 even under autocast (Switch Transformer's selective precision).
    Importance and Load are sums over the batch; with a ParallelGroup they are summed over the
    ranks too (differentiably) before CV², so the losses are those of the global batch.
    Masked (padding) tokens are routed nowhere and left out of Importance and Load, but the
    noise is drawn for every row, padded ones included: a padded batch gives its real tokens
    other noise than the same tokens alone.
    """

    name = "noisy_topk"

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        k: int,
        *,
        w_importance: float = 0.1,
        w_load: float = 0.1,
        noise_epsilon: float = 1e-2,
    ) -> None:
        super().__init__()
        check_top_k(k, n_experts)
        if noise_epsilon < 0:
            raise ValueError(f"noise_epsilon must be >= 0, got {noise_epsilon}")
        self.d_model, self.n_experts, self.k = d_model, n_experts, k
        self.w_importance, self.w_load = w_importance, w_load
        self.noise_epsilon = noise_epsilon
        self.w_gate = nn.Parameter(torch.zeros(d_model, n_experts))
        self.w_noise = nn.Parameter(torch.zeros(d_model, n_experts))

    options: ClassVar[dict[str, str]] = {
        "w_importance": "w_importance",
        "w_load": "w_load",
        "noise_epsilon": "noise_epsilon",
    }

    def gating_ops_per_token(self) -> int:
        return 2 * self.d_model * self.n_experts  # W_g and W_noise, Eq. 3-4

    def route(self, x: Tensor, group: ParallelGroup, mask: Tensor | None) -> Routing:
        """Returns a Routing with K = k slots per token."""
        clean_logits = x @ self.w_gate.to(x.dtype)  # [T, E]
        raw_noise = x @ self.w_noise.to(x.dtype) if self.training else None  # [T, E]
        gating = noisy_top_k_gating(clean_logits, raw_noise, self.k, self.noise_epsilon, mask)
        importance_per_expert = group.sum(
            importance(gating.gates, gating.index, self.n_experts)
        )  # Eq. 6, [E]
        load_per_expert = group.sum(gating.load_per_row.sum(0))  # Eq. 10, [E]
        losses, aux_loss = balance_losses(
            importance_per_expert, load_per_expert, self.w_importance, self.w_load
        )
        return Routing(
            gating.index, gating.gates, importance_per_expert, load_per_expert, losses, aux_loss
        )


__all__ = [
    "NoisyTopKRouter",
    "Router",
    "Routing",
    "TopKGating",
    "assignment_counts",
    "balance_losses",
    "check_top_k",
    "mask_slots",
    "noisy_top_k_gating",
    "router_precision",
]
