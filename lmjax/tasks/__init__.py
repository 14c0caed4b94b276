"""Training tasks (`train.objective`): see `base.Task` for what a task supplies."""

from __future__ import annotations

from lmjax.config import Config, ConfigError
from lmjax.tasks.base import Task
from lmjax.tasks.causal_lm import CausalLMTask
from lmjax.tasks.dpo import DPOTask
from lmjax.tasks.mlm import MLMTask
from lmjax.tasks.seq2seq import EncoderDecoderTask, Seq2SeqTask, SpanCorruptionTask
from lmjax.tasks.sft import SFTTask

TASKS: dict[str, type[Task]] = {task.name: task for task in (CausalLMTask, MLMTask, SpanCorruptionTask, Seq2SeqTask, SFTTask, DPOTask)}


def build_task(cfg: Config) -> Task:
    if cfg.train.objective not in TASKS:
        raise ConfigError(f"train.objective: expected one of {', '.join(TASKS)}, got {cfg.train.objective!r}")
    return TASKS[cfg.train.objective](cfg)


__all__ = [
    "TASKS", "CausalLMTask", "DPOTask", "EncoderDecoderTask", "MLMTask", "SFTTask", "Seq2SeqTask", "SpanCorruptionTask", "Task",
    "build_task",
]
