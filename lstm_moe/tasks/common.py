"""What every task reports alike: the routing statistics of its MoE layers and the
fingerprint of the dataset it trains on."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from lstm_moe.moe import MoEOutput


def routing_stats(results: list[MoEOutput]) -> dict[str, Tensor]:
    """Scalar statistics of a forward pass's MoE layers, detached, for the training log: each
    unweighted auxiliary loss, the coefficients of variation of load and importance, the
    busiest expert's load over the mean, and the fraction of routed pairs that capacity
    dropped. Prefixed `moe<i>_` when the model has more than one MoE layer."""
    stats: dict[str, Tensor] = {}
    for layer, result in enumerate(results):
        prefix = f"moe{layer}_" if len(results) > 1 else ""
        stats.update({prefix + name: v.detach() for name, v in result.losses.items()})
        stats[prefix + "cv_load"] = result.stats.cv_load
        stats[prefix + "cv_importance"] = result.stats.cv_importance
        stats[prefix + "max_over_mean_load"] = result.stats.max_over_mean_load
        stats[prefix + "fraction_dropped"] = result.stats.fraction_dropped
    return stats


def data_fingerprint(data_dir: Path, meta: dict) -> dict:
    """What identifies a prepared dataset: where it is, its recipe and its vocabulary."""
    return {
        "path": str(Path(data_dir).resolve()),
        "dataset": meta.get("dataset"),
        "recipe_id": meta.get("recipe_id"),
        "vocab_size": meta["vocab"]["size"],
        "vocab_sha256": meta["vocab"]["sha256"],
    }
