"""A routed linear projection: y = Σ_i G(x)_i · x·W_i, the MoE layer's router -> dispatcher ->
experts with bias-free linear experts (BatchedLinearExperts) instead of feed-forward networks.
Switch Transformers put such layers in place of self-attention's query, key and value
projections (Fedus et al. 2021, App. A, Figure 10, Table 10, "Switch attention layers").

Index letters: T tokens (all leading dims flattened), D model width, D' output width,
E experts.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor, nn

from .experts import BatchedLinearExperts
from .layer import MoEConfig, MoEOutput, route_and_mix
from .parallel import ParallelGroup
from .routers import build_router
from .workspace import Workspace


class MoEProjection(nn.Module):
    """x[..., D] -> Σ_slot gate · x·W[expert] [..., D'], each token's weight matrix that of the
    expert(s) its router picks, with the router, the one dispatcher and expert parallelism of
    MoELayer, and its result (MoEOutput: output, auxiliary losses, routing statistics).

    config: the router and its options, n_experts, k, the capacity factors and expert_init /
    expert_init_scale; expert_hidden, expert_activation, expert_bias and expert_dropout belong
    to feed-forward experts and are not used (a linear expert has no hidden layer, and the
    projections it replaces are bias-free). d_out: D'. float32: the experts' product in float32
    under autocast (BatchedLinearExperts; Switch Table 10). process_group: expert parallelism
    over its ranks (this rank holds experts [r·E/W, (r+1)·E/W)), None for one process.

    A token that a capacity drops, like a masked one, gets exactly 0: for the attention's
    projections a zero query, key and value (the residual connection around the attention
    carries the token on).
    """

    def __init__(
        self,
        config: MoEConfig,
        d_out: int,
        *,
        float32: bool = True,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.router = build_router(config)
        self.group = ParallelGroup(process_group)
        self.experts = BatchedLinearExperts(
            config.n_experts,
            config.d_model,
            d_out,
            self.group.expert_range(config.n_experts),
            init=config.expert_init,
            init_scale=config.expert_init_scale,
            float32=float32,
        )
        self.d_out = d_out
        self.workspace = Workspace()  # reused CPU buffers of the dispatch (workspace.py)

    def forward(self, x: Tensor, mask: Tensor | None = None, dropless: bool = False) -> MoEOutput:
        """x: [..., D]; mask: [...] bool (x's leading shape), True for a real token, or None.
        A masked token is routed nowhere and counts in no loss, capacity or statistic; its
        output is 0. dropless: no capacity for this call (MoELayer.forward). Returns MoEOutput
        with output [..., D'] (float32 under autocast when the experts keep float32: the
        gates' mix runs in float32 too)."""
        capacity_factor = None if dropless else self.config.capacity_factor_for(self.training)
        return route_and_mix(
            x,
            mask,
            self.router,
            self.experts,
            self.config,
            self.group,
            self.workspace,
            capacity_factor,
        )

    def ops_per_token(self) -> int:
        """Multiply-adds per token: the experts it uses, D·D' each (Table 7's convention), and
        the router's gating product (D·E for Switch's)."""
        config = self.config
        experts = round(config.mean_experts_per_token * config.d_model * self.d_out)
        return experts + self.router.gating_ops_per_token()


__all__ = ["MoEProjection"]
