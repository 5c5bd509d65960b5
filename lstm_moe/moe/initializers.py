"""The Switch Transformer's reduced initialisation (Fedus et al. 2021, §2.4), shared by the
Switch router's W_r and the experts' weights: a normal truncated at two standard deviations,
scaled so that what is left after the truncation has the standard deviation asked for.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

# Standard deviation of a unit normal truncated to [-2, 2]:
# sqrt(1 - 4·φ(2) / (Φ(2) - Φ(-2))), φ and Φ the normal density and CDF.
TRUNCATED_STD = 0.8796256610342398


def reduced_init_std(scale: float, fan_in: int) -> float:
    """sqrt(scale / fan_in): the standard deviation of Switch §2.4 (scale 0.1 where the usual
    variance-scaling initialiser has 1.0)."""
    return math.sqrt(scale / fan_in)


@torch.no_grad()
def truncated_normal_(
    tensor: Tensor, std: float, generator: torch.Generator | None = None
) -> Tensor:
    """Fill tensor in place from N(0, σ²) cut at ±2σ, σ = std / TRUNCATED_STD: a normal cut at
    ±2σ keeps TRUNCATED_STD·σ of its standard deviation, so the values have standard deviation
    `std` (the variance-scaling initialiser the Switch code uses). Every value lies in
    ±2·std / TRUNCATED_STD. generator: None for the global random stream."""
    sigma = std / TRUNCATED_STD
    return nn.init.trunc_normal_(tensor, std=sigma, a=-2 * sigma, b=2 * sigma, generator=generator)


__all__ = ["TRUNCATED_STD", "reduced_init_std", "truncated_normal_"]
