"""The sparsely-gated MoE layer: router -> dispatcher -> experts (Shazeer et al. 2017, §2).

Index letters: T tokens (all leading dims flattened), D model width, E experts,
K routing slots per token, N rows computed by experts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import parallel
from .expert_choice import DEFAULT_CAPACITY_FACTOR as EXPERT_CHOICE_FACTOR
from .experts import EXPERT_ACTIVATIONS, EXPERT_INITS, BatchedExperts
from .parallel import ExpertDispatch, ParallelGroup
from .routers import ROUTERS, build_router
from .routing import Router, Routing
from .workspace import Workspace


@dataclass(frozen=True)
class MoEConfig:
    """Everything that defines one MoE layer. Defaults are the paper's LM values (App. C.1);
    each router's options default to that router's own defaults.

    router: a name in routers.ROUTERS: "noisy_topk" (§2.1), "hierarchical" (App. B),
        "batchwise" (App. F), "switch" (Fedus et al. 2021) or "expert_choice" (Zhou et al.
        2022: every expert takes its top c·T/E tokens; no auxiliary loss).
    k: experts per token; for "hierarchical", experts per token *within each chosen group*
        (the paper uses k_groups = 2 and k = 2, so 4 experts per token).
    n_groups: hierarchical only, the primary branching factor a; n_experts = a·b.
    k_groups: hierarchical only, groups per token.
    capacity_factor: None for dropless, else each expert takes at most
        ceil(capacity_factor · T · experts_per_token / E) tokens, T the real (unmasked) tokens
        of the batch of all ranks. For "expert_choice" it is the c of its choice: each expert
        takes exactly ceil(c · T / E) tokens (at most T); None gives c = 2, and k is unused.
    w_importance, w_load: weights of CV²(Importance) and CV²(Load) (App. A): 0.1 for language
        modelling, 0.01 for translation (the 2017 routers).
    w_threshold: batchwise only, weight of the threshold loss of App. F, Eq. 20.
    noise_epsilon: noisy_topk and hierarchical, added to Softplus(x·W_noise), as in the
        authors' code; 0 gives Eq. 4.
    batchwise_init_std: batchwise only, standard deviation of W_g's normal initialisation;
        None for 1/sqrt(d_model).
    w_balance: switch only, weight α of the load-balancing loss (Switch Eq. 4), 1e-2.
    w_z: switch only, weight of the router z-loss (ST-MoE Eq. 5); 0 as in the Switch paper.
    jitter_eps: switch only, the router's input is multiplied by U(1 - ε, 1 + ε) in training.
    switch_init_scale: switch only, W_r's truncated normal has standard deviation
        sqrt(switch_init_scale / d_model) (the reduced initialisation, Switch §2.4).
    switch_renormalize: switch only, for k > 1 divide the k probabilities by their sum (GShard);
        False uses them as they are (ST-MoE's code).
    expert_bias: give each expert's two layers a bias. Off by default: App. C.1 describes the
        expert as a ReLU hidden layer and an output layer, and the authors' code has no biases.
        (They also cost a per-row gather and a segment sum in the backward.)
    expert_init: "uniform", each expert weight drawn like an nn.Linear's (uniform in
        ±1/sqrt(fan_in)), or "trunc_normal", the Switch Transformer's reduced initialisation
        (§2.4): a normal truncated at ±2 standard deviations, with standard deviation
        sqrt(expert_init_scale / fan_in) after the truncation, biases zero.
    expert_init_scale: the s of "trunc_normal"; Switch uses 0.1 instead of the usual 1.0.
    expert_dropout: dropout on the experts' hidden activations only, in training (Switch §2.4,
        Table 4: 0.4 inside the experts beside the model's own 0.1 when fine-tuning); 0 is none.
    eval_capacity_factor: the capacity factor in evaluation mode, None for capacity_factor's
        (Switch §2.2 gives the factor of the expert capacity; ST-MoE trains at 1.25 and
        evaluates at 2.0, dropping fewer tokens when nothing learns from the drops). Needs a
        capacity_factor: a dropless layer stays dropless.
    expert_activation: "relu", the 2017 expert (App. C.1), or "geglu":
        W_out·(GELU(x·W_gate) ⊙ x·W_in) (Shazeer 2020, "GLU Variants Improve Transformer", §2;
        the T5.1.1 and ST-MoE feed-forward), a third expert tensor w_gate [E, D, H] and a third
        of the multiply-adds more per expert (expert_ops_per_token). No expert_bias with it.
    """

    # Allowed values of the string fields, by field name (shown by --help).
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "expert_init": EXPERT_INITS,
        "expert_activation": EXPERT_ACTIVATIONS,
    }

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
    batchwise_init_std: float | None = None
    w_balance: float = 1e-2
    w_z: float = 0.0
    jitter_eps: float = 1e-2
    switch_init_scale: float = 0.1
    switch_renormalize: bool = True
    expert_bias: bool = False
    expert_init: str = "uniform"
    expert_init_scale: float = 0.1
    expert_dropout: float = 0.0
    eval_capacity_factor: float | None = None
    expert_activation: str = "relu"

    def __post_init__(self) -> None:
        self._check_expert_options()
        for name in ("d_model", "n_experts", "expert_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {tuple(ROUTERS)}, got {self.router!r}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(
                f"capacity_factor must be > 0 (or None for dropless), got {self.capacity_factor}"
            )
        for name in ("noise_epsilon", "w_balance", "w_z"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.jitter_eps < 1:
            raise ValueError(f"jitter_eps must be in [0, 1), got {self.jitter_eps}")
        if self.switch_init_scale <= 0:
            raise ValueError(f"switch_init_scale must be > 0, got {self.switch_init_scale}")
        if self.batchwise_init_std is not None and self.batchwise_init_std <= 0:
            raise ValueError(
                "batchwise_init_std must be > 0 (or None for 1/sqrt(d_model)), "
                f"got {self.batchwise_init_std}"
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

    def _check_expert_options(self) -> None:
        if self.expert_init not in EXPERT_INITS:
            raise ValueError(f"expert_init must be one of {EXPERT_INITS}, got {self.expert_init!r}")
        if not self.expert_init_scale > 0:
            raise ValueError(f"expert_init_scale must be > 0, got {self.expert_init_scale}")
        if not 0 <= self.expert_dropout < 1:
            raise ValueError(f"expert_dropout must be in [0, 1), got {self.expert_dropout}")
        if self.eval_capacity_factor is not None:
            if self.capacity_factor is None and self.router != "expert_choice":
                raise ValueError(
                    "eval_capacity_factor needs a capacity_factor: a dropless layer "
                    "(capacity_factor=None) has no capacity to change in evaluation"
                )
            if not self.eval_capacity_factor > 0:
                raise ValueError(
                    f"eval_capacity_factor must be > 0 (or None for capacity_factor's), "
                    f"got {self.eval_capacity_factor}"
                )
        if self.expert_activation not in EXPERT_ACTIVATIONS:
            raise ValueError(
                f"expert_activation must be one of {EXPERT_ACTIVATIONS}, "
                f"got {self.expert_activation!r}"
            )
        if self.expert_activation == "geglu" and self.expert_bias:
            raise ValueError("expert_activation='geglu' takes no expert_bias (GEGLU has none)")

    @property
    def experts_per_token(self) -> int:
        """Routing slots a token fills (what sizes the capacity of token-choice routers)."""
        return self.k_groups * self.k if self.router == "hierarchical" else self.k

    @property
    def mean_experts_per_token(self) -> float:
        """Experts a token is computed by on average in training, what its active FLOPs are
        counted by: experts_per_token, or for expert choice its capacity factor c (each
        expert takes c·T/E of the T tokens)."""
        if self.router == "expert_choice":
            return EXPERT_CHOICE_FACTOR if self.capacity_factor is None else self.capacity_factor
        return self.experts_per_token

    def capacity_factor_for(self, training: bool) -> float | None:
        """The capacity factor in training or in evaluation mode (eval_capacity_factor)."""
        if training or self.eval_capacity_factor is None:
            return self.capacity_factor
        return self.eval_capacity_factor

    def expert_ops_per_token(self) -> int:
        """Multiply-adds one expert spends on one token, its matrices only: D·H for each of
        W_in and W_out, and D·H more for W_gate of a GEGLU expert."""
        products = 3 if self.expert_activation == "geglu" else 2
        return products * self.d_model * self.expert_hidden


@dataclass
class MoEStats:
    """Routing statistics of one call, all detached, over the batch of all ranks (its real
    tokens only, under a mask).

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


class MoELayer(nn.Module):
    """y = Σ_i G(x)_i E_i(x) (Eq. 1), applied to every position of x[..., D] in one call.

    `MoELayer(d_model, n_experts, expert_hidden, k, router="noisy_topk", **options)` with the
    options of MoEConfig, or `MoELayer.from_config(config)`. A router module (an instance of a
    class in routers.ROUTERS) may be passed instead of a name: its d_model and n_experts must
    be the layer's, k is then the router's experts per token (it sizes the capacity), and
    `layer.config` records the router's name and options (Router.config_fields), so that
    `MoELayer.from_config(layer.config)` builds the same model; an option also passed here must
    agree with the router's.

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
        router: str | Router = "noisy_topk",
        *,
        process_group: dist.ProcessGroup | None = None,
        **options,
    ) -> None:
        super().__init__()
        if isinstance(router, str):
            self.config = MoEConfig(d_model, n_experts, expert_hidden, k, router, **options)
            router = build_router(self.config)
        else:
            self.config = _config_of_router(router, d_model, n_experts, expert_hidden, k, options)
        self.router = router
        self.group = ParallelGroup(process_group)
        first, last = self.group.expert_range(n_experts)
        # This rank's experts only, drawn as one process draws them (BatchedExperts), so that
        # any number of ranks starts from the same model.
        cfg = self.config
        self.experts = BatchedExperts(
            n_experts,
            d_model,
            expert_hidden,
            cfg.expert_bias,
            (first, last),
            init=cfg.expert_init,
            init_scale=cfg.expert_init_scale,
            dropout=cfg.expert_dropout,
            activation=cfg.expert_activation,
        )
        self.workspace = Workspace()  # reused CPU buffers of the dispatch (workspace.py)

    @classmethod
    def from_config(
        cls, config: MoEConfig, process_group: dist.ProcessGroup | None = None
    ) -> MoELayer:
        options = {
            field.name: getattr(config, field.name)
            for field in dataclasses.fields(config)
            if field.name not in ("d_model", "n_experts", "expert_hidden", "k", "router")
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

    def forward(self, x: Tensor, mask: Tensor | None = None, dropless: bool = False) -> MoEOutput:
        """x: [..., D] float; mask: [...] bool (x's leading shape), True for a real token, or
        None (every token real). A masked token is routed to no expert, its output is exactly
        0, and it counts in no loss, capacity or statistic: a padded batch gives its real
        tokens the results of those tokens alone (up to the routers' random draws, which
        padded rows still take). dropless: this call applies no capacity, whatever the config
        says (a decoder's step routes a few rows, one per sentence, where a capacity sized
        for them would drop tokens by collision and make each row's result depend on the
        others'); expert choice, whose capacity is its choice, ignores it.
        Returns MoEOutput with output [..., D]."""
        return route_and_mix(
            x,
            mask,
            self.router,
            self.experts,
            self.config,
            self.group,
            self.workspace,
            capacity_factor=None if dropless else self.config.capacity_factor_for(self.training),
        )

    def mix_experts(
        self,
        tokens: Tensor,
        expert_index: Tensor,
        gates: Tensor,
        slot_priority: bool = False,
        mask: Tensor | None = None,
        dropless: bool = False,
    ) -> tuple[Tensor, ExpertDispatch]:
        """Σ_slot gates · expert(token) for a given routing: dispatch, experts, combine.

        tokens: [T, D]; expert_index (global expert ids), gates: [T, K]; slot_priority: see
        Routing; mask: [T] bool, True for a real token (masked ones are never dispatched), or
        None. Returns ([T, D], what the dispatch did over the batch of all ranks). The
        capacity factor is eval_capacity_factor's in evaluation mode, where one is set, and
        none with dropless.
        """
        capacity_factor = None if dropless else self.config.capacity_factor_for(self.training)
        return parallel.mix_experts(
            tokens,
            expert_index,
            gates,
            self.experts,
            self.config.n_experts,
            self.group,
            capacity_factor,
            self.config.experts_per_token,
            slot_priority,
            mask,
            self.workspace,
        )


def route_and_mix(
    x: Tensor,
    mask: Tensor | None,
    router: Router,
    experts: nn.Module,
    config: MoEConfig,
    group: ParallelGroup,
    workspace: Workspace | None,
    capacity_factor: float | None,
) -> MoEOutput:
    """router -> dispatcher -> experts -> combine for x [..., D] (mask [...] bool or None), the
    one path of MoELayer and of the routed projection (projection.py), whatever the experts
    compute: experts(rows [M, D] sorted by expert, rows_per_expert [L]) -> [M, D']. Token-major
    routings get capacity_factor (None: dropless), expert-major ones (Routing.choice) are
    dispatched as the router chose. Returns MoEOutput with output [..., D']."""
    d_model = config.d_model
    if x.shape[-1] != d_model:
        raise ValueError(f"input width (last dim) must be d_model={d_model}, got {x.shape[-1]}")
    tokens = x.reshape(-1, d_model)  # [T, D]
    token_mask = None
    if mask is not None:
        if mask.dtype != torch.bool or mask.shape != x.shape[:-1]:
            raise ValueError(
                f"mask must be bool of shape {tuple(x.shape[:-1])} (x's leading dims), "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        token_mask = mask.reshape(-1)  # [T]
    routing = router(tokens, group=group, mask=token_mask)
    expert_index, gates = routing.expert_index, routing.gates
    output, dispatch = parallel.mix_experts(
        tokens,
        expert_index,
        gates,
        experts,
        config.n_experts,
        group,
        capacity_factor,
        config.experts_per_token,
        routing.slot_priority,
        token_mask,
        workspace,
        choice=routing.choice,
    )  # [T, D']
    stats = _routing_stats(routing, dispatch.rows_per_expert, dispatch.routed_per_expert)
    output = output.view(*x.shape[:-1], output.shape[-1])
    return MoEOutput(output, routing.aux_loss, routing.losses, stats)


def _config_of_router(
    router: Router, d_model: int, n_experts: int, expert_hidden: int, k: int, options: dict
) -> MoEConfig:
    """The MoEConfig of a layer given a router module: the layer's sizes and options, and the
    router's name and options (what from_config needs to build the same router)."""
    if not isinstance(router, Router) or ROUTERS.get(router.name) is not type(router):
        raise TypeError(
            f"router must be a name in {tuple(ROUTERS)} or an instance of one of their classes, "
            f"got {type(router).__name__}"
        )
    expected = {"d_model": d_model, "n_experts": n_experts, "experts_per_token": k}
    for name, value in expected.items():
        if getattr(router, name) != value:
            raise ValueError(
                f"the router's {name} ({getattr(router, name)}) must equal the layer's ({value})"
            )
    fields = router.config_fields()
    for name, value in fields.items():
        if name in options and options[name] != value:
            raise ValueError(
                f"the router's {name} ({value!r}) must equal the layer's ({options[name]!r})"
            )
    # fields hold the router's n_experts (checked above) and its k (for "hierarchical", k per
    # chosen group, not the layer's experts per token).
    return MoEConfig(d_model=d_model, expert_hidden=expert_hidden, **{**options, **fields})
