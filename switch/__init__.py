"""Switch Transformer routing and backbones (Fedus et al. 2021), built on `lstm_moe.moe`."""

from .router import SwitchRouter, load_balancing_loss

__all__ = ["SwitchRouter", "load_balancing_loss"]
