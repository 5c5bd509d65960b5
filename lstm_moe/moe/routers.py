"""Every router by the name a MoEConfig gives it: the one mapping from `MoEConfig.router` to a
router class, and the function that builds a config's router.

Each class reads its own options from the config (`from_config`) and reports them back
(`config_fields`), so that a layer built from a router module records a config that rebuilds it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .batchwise import BatchwiseRouter
from .expert_choice import ExpertChoiceRouter
from .hierarchical import HierarchicalRouter
from .routing import NoisyTopKRouter, Router
from .switch_router import SwitchRouter

if TYPE_CHECKING:
    from .layer import MoEConfig

ROUTERS: dict[str, type[Router]] = {
    "noisy_topk": NoisyTopKRouter,  # Shazeer et al. 2017, §2.1 and App. A
    "hierarchical": HierarchicalRouter,  # 2017, App. B
    "batchwise": BatchwiseRouter,  # 2017, App. F
    "switch": SwitchRouter,  # Fedus et al. 2021, top-1 (or top-k) of a softmax
    "expert_choice": ExpertChoiceRouter,  # Zhou et al. 2022, each expert picks its tokens
}


def build_router(config: MoEConfig) -> Router:
    """The router module that `config.router` names, with the config's options."""
    return ROUTERS[config.router].from_config(config)


__all__ = ["ROUTERS", "build_router"]
