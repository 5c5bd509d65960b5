"""The sparsely-gated MoE layer: router -> dispatcher -> experts (Shazeer et al. 2017, §2).

Index letters: T tokens (all leading dims flattened), D model width, E experts,
K routing slots per token, N rows computed by experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch import Tensor, nn

from . import parallel
from .batchwise import BatchwiseRouter
from .experts import BatchedExperts
from .hierarchical import HierarchicalRouter
from .parallel import ExpertDispatch, ParallelGroup
from .routing import NoisyTopKRouter, Routing

ROUTERS = ("noisy_topk", "hierarchical", "batchwise")


@dataclass(frozen=True)
class MoEConfig:
    """Everything that defines one MoE layer. Defaults are the paper's LM values (App. C.1).

    router: "noisy_topk" (§2.1), "hierarchical" (App. B) or "batchwise" (App. F).
    k: experts per token; for "hierarchical", experts per token *within each chosen group*
        (the paper uses k_groups = 2 and k = 2, so 4 experts per token).
    n_groups: hierarchical only, the primary branching factor a; n_experts = a·b.
    capacity_factor: None for dropless, else each expert takes at most
        ceil(capacity_factor · T · experts_per_token / E) tokens.
    w_importance, w_load: weights of CV²(Importance) and CV²(Load) (App. A): 0.1 for language
        modelling, 0.01 for translation.
    w_threshold: batchwise only, weight of the threshold loss of App. F, Eq. 20.
    noise_epsilon: added to Softplus(x·W_noise), as in the authors' code; 0 gives Eq. 4.
    expert_bias: give each expert's two layers a bias. Off by default: App. C.1 describes the
        expert as a ReLU hidden layer and an output layer, and the authors' code has no biases.
        (They also cost a per-row gather and a segment sum in the backward.)
    """

    d_model: int
    n_experts: int
    expert_hidden: int
    k: int = 4
    router: str = "noisy_topk"
    n_groups: int | None = None
    k_groups: int = 2
    capacity_factor: float | None = None
    w_importance: float = 0.1
    w_load: float = 0.1
    w_threshold: float = 1.0
    noise_epsilon: float = 1e-2
    expert_bias: bool = False

    def __post_init__(self) -> None:
        for name in ("d_model", "n_experts", "expert_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {self.router!r}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(
                f"capacity_factor must be > 0 (or None for dropless), got {self.capacity_factor}"
            )
        if self.router == "hierarchical":
            if self.n_groups is None or self.n_groups < 1:
                raise ValueError(
                    "n_groups must be an integer >= 1 for the hierarchical router, "
                    f"got {self.n_groups}"
                )
            if self.n_experts % self.n_groups:
                raise ValueError(
                    f"n_experts ({self.n_experts}) must be a multiple of n_groups ({self.n_groups})"
                    " for the hierarchical router"
                )
            if not 1 <= self.k_groups <= self.n_groups:
                raise ValueError(f"k_groups must be in [1, {self.n_groups}], got {self.k_groups}")
            if not 1 <= self.k <= self.n_experts // self.n_groups:
                raise ValueError(
                    f"k must be in [1, {self.n_experts // self.n_groups}] (experts per group), "
                    f"got {self.k}"
                )
        elif not 1 <= self.k <= self.n_experts:
            raise ValueError(
                f"k must be in [1, {self.n_experts}] (the number of experts), got {self.k}"
            )

    @property
    def experts_per_token(self) -> int:
        return self.k_groups * self.k if self.router == "hierarchical" else self.k


@dataclass
class MoEStats:
    """Routing statistics of one call, all detached, over the batch of all ranks.

    tokens_per_expert: [E] rows each expert computed (after capacity).
    importance: [E] Σ_x G(x); load: [E] the router's Load (smooth estimate in training).
    cv_importance, cv_load: coefficients of variation (not squared).
    max_over_mean_load: busiest expert's routed tokens over the mean (1.0 = balanced).
    fraction_dropped: routed (token, expert) pairs that capacity dropped.
    """

    tokens_per_expert: Tensor
    importance: Tensor
    load: Tensor
    cv_importance: Tensor
    cv_load: Tensor
    max_over_mean_load: Tensor
    fraction_dropped: Tensor
    extra: dict[str, Tensor]


@dataclass
class MoEOutput:
    """output: [..., D]; aux_loss: scalar to add to the training loss; losses: unweighted."""

    output: Tensor
    aux_loss: Tensor
    losses: dict[str, Tensor]
    stats: MoEStats


def _routing_stats(routing: Routing, rows: Tensor, routed: Tensor) -> MoEStats:
    routed = routed.float()
    cv = {}
    for name in ("importance", "load"):
        values = getattr(routing, name).detach()
        cv[name] = (values.var(unbiased=False) / values.mean().pow(2).clamp(min=1e-20)).sqrt()
    n_routed = routed.sum()
    return MoEStats(
        tokens_per_expert=rows.detach(),
        importance=routing.importance.detach(),
        load=routing.load.detach(),
        cv_importance=cv["importance"],
        cv_load=cv["load"],
        max_over_mean_load=routed.max() / routed.mean().clamp(min=1e-20),
        fraction_dropped=(n_routed - rows.sum()) / n_routed.clamp(min=1),
        extra={name: value.detach() for name, value in routing.extra_stats.items()},
    )


def build_router(config: MoEConfig) -> nn.Module:
    """The router module that `config.router` names."""
    balance = {"w_importance": config.w_importance, "w_load": config.w_load}
    if config.router == "noisy_topk":
        return NoisyTopKRouter(
            config.d_model,
            config.n_experts,
            config.k,
            noise_epsilon=config.noise_epsilon,
            **balance,
        )
    if config.router == "hierarchical":
        return HierarchicalRouter(
            config.d_model,
            config.n_groups,
            config.n_experts // config.n_groups,
            config.k_groups,
            config.k,
            noise_epsilon=config.noise_epsilon,
            **balance,
        )
    return BatchwiseRouter(
        config.d_model, config.n_experts, config.k, w_threshold=config.w_threshold, **balance
    )


class MoELayer(nn.Module):
    """y = Σ_i G(x)_i E_i(x) (Eq. 1), applied to every position of x[..., D] in one call.

    `MoELayer(d_model, n_experts, expert_hidden, k, router="noisy_topk", **options)` with the
    options of MoEConfig, or `MoELayer.from_config(config)`. A router module may be passed
    instead of a name; it must map (x[T, D], group=ParallelGroup | None) to a Routing over
    n_experts, with its importance, load and losses over the batch of all ranks of the group;
    k is then the router's experts per token (it sizes the capacity), and the config's other
    routing fields do not apply. switch.SwitchRouter is such a module.

    process_group: expert parallelism over the ranks of a torch.distributed group (parallel.py):
    this rank holds experts [r·E/W, (r+1)·E/W) and routes its own tokens; every rank calls the
    layer together. None (the default) is one process, through the same code.
    """

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        expert_hidden: int,
        k: int = 4,
        router: str | nn.Module = "noisy_topk",
        *,
        process_group: dist.ProcessGroup | None = None,
        **options,
    ) -> None:
        super().__init__()
        router_name = router if isinstance(router, str) else "noisy_topk"
        self.config = MoEConfig(d_model, n_experts, expert_hidden, k, router_name, **options)
        self.group = ParallelGroup(process_group)
        first, last = self.group.expert_range(n_experts)
        if isinstance(router, str):
            self.router = build_router(self.config)
        else:
            expected = {"n_experts": n_experts, "experts_per_token": k}
            for name, value in expected.items():
                if getattr(router, name, value) != value:
                    raise ValueError(
                        f"the router's {name} ({getattr(router, name)}) must equal the layer's "
                        f"({value})"
                    )
            self.router = router
        # This rank's experts only, drawn as one process draws them (BatchedExperts), so that
        # any number of ranks starts from the same model.
        self.experts = BatchedExperts(
            n_experts, d_model, expert_hidden, self.config.expert_bias, (first, last)
        )

    @classmethod
    def from_config(
        cls, config: MoEConfig, process_group: dist.ProcessGroup | None = None
    ) -> MoELayer:
        options = {
            name: getattr(config, name)
            for name in config.__dataclass_fields__
            if name not in ("d_model", "n_experts", "expert_hidden", "k", "router")
        }
        return cls(
            config.d_model,
            config.n_experts,
            config.expert_hidden,
            config.k,
            config.router,
            process_group=process_group,
            **options,
        )

    def forward(self, x: Tensor) -> MoEOutput:
        """x: [..., D] float. Returns MoEOutput with output [..., D]."""
        d_model = self.config.d_model
        if x.shape[-1] != d_model:
            raise ValueError(f"input width (last dim) must be d_model={d_model}, got {x.shape[-1]}")
        tokens = x.reshape(-1, d_model)  # [T, D]
        routing = self.router(tokens, group=self.group)
        output, dispatch = self.mix_experts(
            tokens, routing.expert_index, routing.gates, routing.slot_priority
        )
        stats = _routing_stats(routing, dispatch.rows_per_expert, dispatch.routed_per_expert)
        output = output.view(*x.shape[:-1], d_model)
        return MoEOutput(output, routing.aux_loss, routing.losses, stats)

    def mix_experts(
        self, tokens: Tensor, expert_index: Tensor, gates: Tensor, slot_priority: bool = False
    ) -> tuple[Tensor, ExpertDispatch]:
        """Σ_slot gates · expert(token) for a given routing: dispatch, experts, combine.

        tokens: [T, D]; expert_index (global expert ids), gates: [T, K]; slot_priority: see
        Routing. Returns ([T, D], what the dispatch did over the batch of all ranks).
        """
        return parallel.mix_experts(
            tokens,
            expert_index,
            gates,
            self.experts,
            self.config.n_experts,
            self.group,
            self.config.capacity_factor,
            self.config.experts_per_token,
            slot_priority,
        )
