"""What a task supplies to the training engine: its model, its batches, the loss of one
micro-batch, its validation and the state it carries between steps.

The engine knows no model, data format or metric; a task knows its data and its metric and
builds its model; the model knows neither how it is trained nor how it is evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from lstm_moe.moe.parallel import ParallelGroup


@dataclass
class StepOutput:
    """The forward pass of one micro-batch on this rank.

    loss_sum: the task loss summed over this rank's real target tokens (a scalar with a
        graph); the engine divides it by the global count of real targets of the step.
    aux_loss: the MoE layers' weighted balancing losses (already those of the batch of all
        ranks, so the same value on every rank).
    stats: scalar tensors to average into the log (routing statistics, each loss unweighted),
        the same on every rank; detached.
    reported_sum: what to log as the loss in place of loss_sum (summed over the same
        targets, detached), None for loss_sum itself: for a task whose training objective is
        not the loss its runs are compared on (a distilled model trains on a mixture with
        its teacher's probabilities and reports its ground-truth NLL).
    """

    loss_sum: Tensor
    aux_loss: Tensor
    stats: dict[str, Tensor] = field(default_factory=dict)
    reported_sum: Tensor | None = None


class Task(Protocol):
    """The interface lstm_moe.engine.Trainer trains through. A task is built with its
    configs, its dataset folder and the ParallelGroup of the run; every method that takes no
    group is local to the rank.

    name: the task's name in config.json and on the command line (`--task`).
    model_config_class, config_class: the dataclasses of its model and of its own config;
        presets() names model configs, dataset_overrides(data_dir) the model fields a new run
        takes from its data (both for the command line).
    config: the task's own config dataclass (batch shape, validation size): saved in the
        checkpoint; fields in `resumable_fields` may change when a run resumes.
    """

    name: ClassVar[str]
    model_config_class: ClassVar[type]
    config_class: ClassVar[type]
    resumable_fields: ClassVar[frozenset[str]]
    config: Any
    model_config: Any

    def __init__(
        self,
        model_config: Any,
        config: Any,
        data_dir: Path,
        group: ParallelGroup | None = None,
        micro_batches: int = 1,
        seed: int = 1,
    ) -> None:
        """micro_batches: how many the engine splits each step into; seed: the run's (for
        draws the task keys itself, such as the LM's sampled-softmax candidates)."""

    @staticmethod
    def presets() -> dict[str, Any]:
        """Named model configs (`--preset`)."""

    @staticmethod
    def dataset_overrides(data_dir: Path) -> dict:
        """Model fields a new run takes from its dataset (a vocabulary size)."""

    @staticmethod
    def data_dir_of(record: dict) -> Path:
        """The dataset folder a run trained on, from the record() saved in its config.json."""

    def build_model(self) -> nn.Module:
        """The model, drawn from the current random state (the engine seeds it), with this
        rank's share of the experts."""

    def train_batch(self, step: int, micro: int, micro_batches: int) -> Any:
        """This rank's micro-batch `micro` of `micro_batches` of step `step` (0-based). Cheap:
        the engine fetches every micro-batch of a step before running them."""

    def count_targets(self, batch: Any) -> int:
        """Real target tokens in a batch (padding excluded): a host int, known before the
        forward pass, so the loss can be normalised by the global count."""

    def forward(
        self, model: nn.Module, batch: Any, step: int, micro: int, device: torch.device
    ) -> StepOutput:
        """Training forward pass of one micro-batch (the model is in training mode and under
        the engine's autocast). May update the task's carried state (an LSTM's)."""

    def validate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """Validation metrics, summed over the ranks of the group (every rank calls it with
        the same model): e.g. {"valid_nll": ..., "valid_ppl": ...}. Empty without data."""

    def state_dict(self) -> dict:
        """The task's resumable state (carried LSTM state, data position), as one process
        would hold it: every rank calls it together (it may gather over the group)."""

    def load_state_dict(self, state: dict) -> None:
        """Restore state_dict()'s output, on any number of ranks (this rank's share)."""

    def record(self, model: nn.Module) -> dict:
        """What config.json says of the task beside the configs: the dataset's fingerprint and
        the model's size."""

    def check_resume(self, saved_record: dict, source: str) -> None:
        """Refuse (ValueError) to resume a checkpoint whose record says it was trained on
        other data; source names the checkpoint."""

    def loss_metrics(self, loss: float) -> dict[str, float]:
        """What the task derives from a logged mean training loss (a perplexity, say)."""

    def progress_total(self, max_tokens: int) -> int | None:
        """Steps that max_tokens takes, when each step has a fixed number of targets (for the
        progress bar); None when it varies."""

    def summary(self, model: nn.Module) -> str:
        """One line on the model for the start of a run (its size)."""


def parameters_of(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The trained parameters by name, in registration order."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


__all__ = ["ParallelGroup", "StepOutput", "Task", "parameters_of"]
