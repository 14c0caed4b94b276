"""Training tasks (`train.objective`): see `base.Task` for what a task supplies."""

from __future__ import annotations

from lmjax.config import Config, ConfigError
from lmjax.tasks.base import Task
from lmjax.tasks.causal_lm import CausalLMTask
from lmjax.tasks.mlm import MLMTask

TASKS: dict[str, type[Task]] = {task.name: task for task in (CausalLMTask, MLMTask)}


def build_task(cfg: Config) -> Task:
    if cfg.train.objective not in TASKS:
        raise ConfigError(f"train.objective: expected one of {', '.join(TASKS)}, got {cfg.train.objective!r}")
    return TASKS[cfg.train.objective](cfg)


__all__ = ["TASKS", "CausalLMTask", "MLMTask", "Task", "build_task"]
