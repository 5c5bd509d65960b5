"""Expert-choice routing (Zhou et al. 2022): the public import path.

The implementation lives in the core (lstm_moe/moe/expert_choice.py), beside the other
routers, so that one mapping (lstm_moe.moe.routers.ROUTERS) builds it by name
(`router="expert_choice"`); the core never imports this package.
"""

from lstm_moe.moe.expert_choice import DEFAULT_CAPACITY_FACTOR, ExpertChoiceRouter

__all__ = ["DEFAULT_CAPACITY_FACTOR", "ExpertChoiceRouter"]
