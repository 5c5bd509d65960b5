"""The Switch Transformer router (Fedus et al. 2021): the public import path.

The implementation lives in the core (lstm_moe/moe/switch_router.py), beside the 2017 routers,
because the core holds every router so that one mapping (lstm_moe.moe.routers.ROUTERS) builds
them all from a MoEConfig by name, and the core never imports this package. This module
re-exports it unchanged: `switch.SwitchRouter` is `lstm_moe.moe.SwitchRouter`.
"""

from lstm_moe.moe.switch_router import TRUNCATED_STD, SwitchRouter, load_balancing_loss

__all__ = ["TRUNCATED_STD", "SwitchRouter", "load_balancing_loss"]
