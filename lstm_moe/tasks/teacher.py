"""A trained run's model as the frozen teacher of a task's model: distillation (Switch §4.2,
switch.distill), shared by the language-model and translation tasks.

The task loads the teacher once (refusing a run trained on other data), initialises its
model's non-expert weights from it (switch.distill.copy_non_expert_weights), and trains on
the mixture (1 - w)·NLL(ground truth) + w·CE(teacher probabilities). The teacher runs in
evaluation mode (no dropout, no router noise, the evaluation capacity), in float32 outside the
engine's autocast and without gradients, on the batch the student trains on.

The logged loss stays the ground-truth term (what a run without a teacher logs as its loss,
label smoothing included), so runs stay comparable; the objective and the teacher's term are
logged beside it as distill_loss and teacher_ce. On W ranks every rank holds the whole
teacher (its experts included) and runs it on its own share of the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from lstm_moe.engine.task import StepOutput
from lstm_moe.moe.parallel import ParallelGroup
from switch.distill import WeightCopy, copy_non_expert_weights, mix_terms


class Teacher:
    """The teacher of a distillation run.

    run_dir: the teacher's run folder; weight: w, the teacher's share of the soft target;
    load: the task's load_trained_model(run_dir, device); check_data(run_config, source): the
    task's refusal (ValueError) of a run trained on another dataset than the student's.
    """

    def __init__(
        self,
        run_dir: str | Path,
        weight: float,
        load: Callable,
        check_data: Callable[[dict, str], None],
    ):
        self.run_dir = Path(run_dir)
        self.weight = weight
        model, _, _, run_config, self.step, self.tokens = load(self.run_dir, torch.device("cpu"))
        check_data(run_config, f"the teacher run {self.run_dir}")
        model.requires_grad_(False)
        self.model: nn.Module = model.eval()
        self.device = torch.device("cpu")
        self.copy: WeightCopy | None = None

    def initialise(self, student: nn.Module) -> nn.Module:
        """Copy the teacher's non-expert weights into student (a new run's; a resumed run's
        checkpoint then replaces them with the trained ones)."""
        self.copy = copy_non_expert_weights(self.model, student)
        return student

    def on(self, device: torch.device) -> nn.Module:
        """The teacher model on device (moved there once)."""
        if device != self.device:
            self.model.to(device)
            self.device = device
        return self.model

    def step_output(
        self,
        nll: Tensor,
        teacher_ce: Tensor,
        mask: Tensor | None,
        aux_loss: Tensor,
        stats: dict[str, Tensor],
        group: ParallelGroup,
    ) -> StepOutput:
        """The step of a micro-batch from its per-target terms (nll [N], teacher_ce [N],
        mask [N] bool or None): the mixed loss to train on, the ground-truth NLL to log, and
        the means of the mixture and of the teacher's term over the micro-batch of all ranks."""
        if mask is not None:
            nll, teacher_ce = nll * mask, teacher_ce * mask
        count = nll.new_tensor(float(nll.numel())) if mask is None else mask.sum().to(nll.dtype)
        loss_sum = mix_terms(nll.sum(), teacher_ce.sum(), self.weight)
        totals = group.sum(torch.stack([loss_sum.detach(), teacher_ce.sum().detach(), count]))
        stats = {
            **stats,
            "distill_loss": totals[0] / totals[2].clamp(min=1),
            "teacher_ce": totals[1] / totals[2].clamp(min=1),
        }
        return StepOutput(loss_sum, aux_loss, stats, reported_sum=nll.sum().detach())

    def summary(self) -> str:
        """One line for the start of a run: the teacher and what the initialisation copied."""
        copied = "" if self.copy is None else f": {self.copy.summary()} (config.json: teacher)"
        return f"distilled from {self.run_dir} at step {self.step} (w = {self.weight}){copied}"

    def record(self) -> dict:
        """What config.json says of the teacher: its run, the checkpoint it was read at and
        what the initialisation copied."""
        entry = {
            "run": str(self.run_dir),
            "step": self.step,
            "tokens": self.tokens,
            "weight": self.weight,
        }
        if self.copy is not None:
            entry["copied"] = self.copy.copied
            entry["skipped"] = self.copy.skipped
        return entry

    def check_resume(self, saved: dict | None, source: str) -> None:
        """Refuse to resume a distillation whose teacher has trained on since: the run would
        go on against another teacher than the one it started with."""
        if saved is None:
            raise ValueError(f"{source} was not trained with a teacher")
        if (saved["step"], saved["tokens"]) != (self.step, self.tokens):
            raise ValueError(
                f"the teacher run {self.run_dir} is at step {self.step} now, but {source} was "
                f"distilled from its step {saved['step']}: resume it against that checkpoint"
            )


__all__ = ["Teacher"]
