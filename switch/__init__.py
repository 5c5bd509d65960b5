"""Switch Transformer routing (Fedus et al. 2021): the top-1 (or top-2) router with its balance
loss, router z-loss, float32 router and reduced initialisation, on `lstm_moe.moe`'s dispatcher
and experts (it lives in the core, beside the 2017 routers, so one mapping builds them all)."""

from .router import SwitchRouter, load_balancing_loss

__all__ = ["SwitchRouter", "load_balancing_loss"]
