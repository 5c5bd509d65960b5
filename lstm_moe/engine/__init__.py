"""The task-agnostic training engine: a Trainer that trains any Task (engine.task) with
budgets, the App. C.1 schedule, gradient accumulation, checkpoints, exact resume and data +
expert parallelism. It knows no model, data format or metric."""

from .config import RESUMABLE_FIELDS, TrainConfig
from .task import StepOutput, Task
from .trainer import Trainer, learning_rate_factor

__all__ = [
    "RESUMABLE_FIELDS",
    "StepOutput",
    "Task",
    "TrainConfig",
    "Trainer",
    "learning_rate_factor",
]
