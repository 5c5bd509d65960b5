"""The sparsely-gated Mixture-of-Experts layer (Shazeer et al. 2017).

router (routing.py, hierarchical.py, batchwise.py, switch_router.py, expert_choice.py; by name
through routers.ROUTERS) -> dispatcher (dispatch.py) -> batched experts (experts.py), with the
experts sharded over ranks by parallel.py (one rank is the same code), assembled in layer.py; the
same router and dispatcher with linear experts make a routed projection (projection.py).
"""

from .batchwise import BatchwiseRouter
from .dispatch import (
    DispatchPlan,
    ExpertChoice,
    combine_rows,
    expert_capacity,
    gather_rows,
    plan_choice,
    plan_dispatch,
)
from .expert_choice import ExpertChoiceRouter
from .experts import BatchedExperts, BatchedLinearExperts, grouped_matmul
from .hierarchical import HierarchicalRouter
from .layer import MoEConfig, MoELayer, MoEOutput, MoEStats
from .losses import cv_squared, prob_in_top_k
from .parallel import (
    ExpertDispatch,
    ParallelGroup,
    expert_tensor_names,
    gather_state_dict,
    shard_state_dict,
    share_capacity,
)
from .projection import MoEProjection
from .routers import ROUTERS, build_router
from .routing import NoisyTopKRouter, Router, Routing, noisy_top_k_gating
from .switch_router import SwitchRouter, load_balancing_loss

__all__ = [
    "ROUTERS",
    "BatchedExperts",
    "BatchedLinearExperts",
    "BatchwiseRouter",
    "DispatchPlan",
    "ExpertChoice",
    "ExpertChoiceRouter",
    "ExpertDispatch",
    "HierarchicalRouter",
    "MoEConfig",
    "MoELayer",
    "MoEOutput",
    "MoEProjection",
    "MoEStats",
    "NoisyTopKRouter",
    "ParallelGroup",
    "Router",
    "Routing",
    "SwitchRouter",
    "build_router",
    "combine_rows",
    "cv_squared",
    "expert_capacity",
    "expert_tensor_names",
    "gather_rows",
    "gather_state_dict",
    "grouped_matmul",
    "load_balancing_loss",
    "noisy_top_k_gating",
    "plan_choice",
    "plan_dispatch",
    "prob_in_top_k",
    "shard_state_dict",
    "share_capacity",
]
