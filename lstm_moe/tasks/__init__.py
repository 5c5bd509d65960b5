"""What each task supplies to the engine (lstm_moe.engine.task.Task): its data, its model,
its loss, its validation. TASKS names every task the command line can train."""

from .lm import LanguageModelTask, LMTaskConfig

# The one mapping from `--task` to the task's class.
TASKS = {LanguageModelTask.name: LanguageModelTask}

__all__ = ["TASKS", "LMTaskConfig", "LanguageModelTask"]
