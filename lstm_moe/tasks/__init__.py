"""What each task supplies to the engine (lstm_moe.engine.task.Task): its data, its model,
its loss, its validation. TASKS names every task the command line can train."""

from .lm import LanguageModelTask, LMTaskConfig
from .translation import TranslationTask, TranslationTaskConfig

# The one mapping from `--task` to the task's class.
TASKS = {LanguageModelTask.name: LanguageModelTask, TranslationTask.name: TranslationTask}

__all__ = [
    "TASKS",
    "LMTaskConfig",
    "LanguageModelTask",
    "TranslationTask",
    "TranslationTaskConfig",
]
