"""Switch Transformer routing (Fedus et al. 2021): the top-1 (or top-2) router with its balance
loss, router z-loss, float32 router and reduced initialisation, and expert-choice routing (Zhou
et al. 2022), on `lstm_moe.moe`'s dispatcher and experts (both live in the core, beside the
2017 routers, so one mapping builds them all); the Transformer backbones in transformer.py."""

from .expert_choice import ExpertChoiceRouter
from .router import SwitchRouter, load_balancing_loss

__all__ = ["ExpertChoiceRouter", "SwitchRouter", "load_balancing_loss"]
