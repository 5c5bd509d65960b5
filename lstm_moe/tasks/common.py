"""What every task does alike: the routing statistics of its MoE layers (per step, and summed
over an evaluation), the fingerprint of the dataset it trains on, and loading a trained run's
model for evaluation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from lstm_moe.engine.checkpoint import load_run_checkpoint
from lstm_moe.fields import config_from_dict
from lstm_moe.files import read_json
from lstm_moe.moe import MoEOutput
from lstm_moe.moe.parallel import ParallelGroup, expert_tensor_names, shard_state_dict


@dataclass(frozen=True)
class Architecture:
    """One model family a task trains: its config dataclass and the model it builds, called
    as model_class(config, process_group)."""

    config_class: type
    model_class: Callable[..., nn.Module]


def architecture_of(architectures: dict[str, Architecture], model_config) -> str:
    """The name of the architecture whose config class model_config is."""
    for name, arch in architectures.items():
        if type(model_config) is arch.config_class:
            return name
    raise ValueError(
        f"{type(model_config).__name__} is not the config of any architecture of this task "
        f"({', '.join(f'{n}: {a.config_class.__name__}' for n, a in architectures.items())})"
    )


def run_architecture(run_config: dict) -> str:
    """The architecture a run folder's config.json names ("lstm" when it predates the field)."""
    return run_config.get("arch", "lstm")


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


def check_same_dataset(saved: dict, data_dir: Path, meta: dict, source: str) -> None:
    """Refuse (ValueError) a dataset whose recipe or vocabulary is not the one of `saved` (the
    data_fingerprint a checkpoint recorded); source names the checkpoint."""
    if saved["recipe_id"] != meta.get("recipe_id"):
        raise ValueError(
            f"{data_dir} (recipe {meta.get('recipe_id')}) is not the dataset "
            f"{source} was trained on (recipe {saved['recipe_id']})"
        )
    if saved["vocab_sha256"] != meta["vocab"]["sha256"]:
        raise ValueError(
            f"the vocabulary of {data_dir} (sha256 {meta['vocab']['sha256'][:12]}) "
            f"is not the one {source} was trained with ({saved['vocab_sha256'][:12]})"
        )


def _cv(values: Tensor) -> float:
    mean = values.mean()
    return float(values.std(unbiased=False) / mean) if mean > 0 else 0.0


def routing_summary(tokens_per_expert: Tensor, importance: Tensor, fraction_dropped: float) -> dict:
    """Balance of one MoE layer over a whole evaluation (Load here counts routed tokens, the
    real ones only). fraction_dropped is the mean over batches."""
    return {
        "tokens_per_expert": tokens_per_expert.long().tolist(),
        "cv_load": _cv(tokens_per_expert),
        "cv_importance": _cv(importance),
        "max_over_mean_load": float(tokens_per_expert.max() / tokens_per_expert.mean())
        if tokens_per_expert.mean() > 0
        else 0.0,
        "unused_experts": int((tokens_per_expert == 0).sum()),
        "fraction_dropped": fraction_dropped,
    }


class RoutingTotals:
    """Each MoE layer's routed tokens and importance per expert, summed over the batches of an
    evaluation (the stats are already those of all ranks), and its dropped fraction averaged."""

    def __init__(self) -> None:
        self.routed: list[Tensor] = []
        self.importance: list[Tensor] = []
        self.dropped: list[float] = []
        self.batches = 0

    def add(self, results: list[MoEOutput]) -> None:
        self.batches += 1
        for layer, result in enumerate(results):
            if len(self.routed) <= layer:
                zeros = torch.zeros_like(result.stats.tokens_per_expert, dtype=torch.float64)
                self.routed.append(zeros)
                self.importance.append(torch.zeros_like(zeros))
                self.dropped.append(0.0)
            self.routed[layer] += result.stats.tokens_per_expert.double()
            self.importance[layer] += result.stats.importance.double()
            self.dropped[layer] += float(result.stats.fraction_dropped)

    def summaries(self) -> list[dict]:
        return [
            routing_summary(r, i, d / max(self.batches, 1))
            for r, i, d in zip(self.routed, self.importance, self.dropped, strict=True)
        ]


def load_run_model(
    run_dir: Path,
    device: torch.device,
    task_name: str,
    architectures: dict[str, Architecture],
    read_dataset_meta: Callable[[Path], dict],
    group: ParallelGroup | None = None,
):
    """The model of a run folder (config.json + checkpoint.pt) of task `task_name`, of the
    architecture its config.json names, its experts reassembled from however many ranks
    saved them (and, with a group of W ranks, cut to this rank's share), with its dataset's
    folder and meta.json, after checking that they belong together. Returns (model in eval
    mode on device, data_dir, meta, run_config, checkpoint step, tokens trained)."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: is {run_dir} a training run?")
    run_config = read_json(config_path)
    if run_config.get("task", "lm") != task_name:
        raise ValueError(
            f"{run_dir} is a {run_config.get('task', 'lm')!r} run, not a {task_name!r} one"
        )
    arch_name = run_architecture(run_config)
    if arch_name not in architectures:
        raise ValueError(f"{config_path}: unknown architecture {arch_name!r}")
    arch = architectures[arch_name]
    model_config = config_from_dict(arch.config_class, run_config["model"])
    data_dir = Path(run_config["data"]["path"])
    meta = read_dataset_meta(data_dir)
    group = ParallelGroup() if group is None else group
    model = arch.model_class(model_config, group.process_group)
    expert_names = expert_tensor_names(model)
    ckpt = load_run_checkpoint(run_dir, optimizer=False, expert_names=expert_names)
    if config_from_dict(arch.config_class, ckpt["model_config"]) != model_config:
        raise ValueError(f"{run_dir}: config.json and checkpoint.pt describe different models")
    if ckpt["task_record"]["data"]["vocab_sha256"] != meta["vocab"]["sha256"]:
        raise ValueError(f"{data_dir}'s vocabulary is not the one {run_dir} was trained with")
    model.load_state_dict(shard_state_dict(ckpt["model"], group, expert_names))
    model.to(device).eval()
    return model, data_dir, meta, run_config, ckpt["step"], ckpt["tokens"]
