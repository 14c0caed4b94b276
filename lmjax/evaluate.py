"""Validation metrics, and loading a finished (or interrupted) run back from its directory.

`evaluate` is what the trainer logs as `eval_*` (for causal LMs eval_loss / eval_ppl / eval_bpb;
each task names its own, `lmjax.tasks`); `lmjax eval RUN_DIR` recomputes the same numbers from the
latest checkpoint. Bits per byte divide the summed loss (in bits) by the UTF-8 bytes the target
tokens stand for, so runs with different tokenizers compare.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from lmjax import sharding
from lmjax.config import Config, load_config, replace
from lmjax.errors import CheckpointError
from lmjax.tasks import Task
from lmjax.train.checkpoint import Checkpointer
from lmjax.train.step import ModelSetup


def evaluate(eval_step: Callable, task: Task, params: Any, frozen: Any, batches: Iterable[dict], constants: Any) -> dict[str, float]:
    """The task's eval metrics over `batches`: sums added up on the host, turned into means once.

    Tasks whose sums hold `loss_sum` and `tokens` also get `eval_loss_stderr` from two batches on."""
    totals: dict[str, float] = {}
    per_batch: list[tuple[float, float]] = []
    for batch in batches:
        sums = jax.device_get(eval_step(params, frozen, batch, constants))
        for name, value in sums.items():
            totals[name] = totals.get(name, 0.0) + float(value)
        if "loss_sum" in sums and "tokens" in sums:
            per_batch.append((float(sums["loss_sum"]), float(sums["tokens"])))
    metrics = task.eval_metrics(totals)
    if "eval_loss" in metrics and len(per_batch) >= 2:
        metrics["eval_loss_stderr"] = ratio_stderr(*np.array(per_batch).T)
    return metrics


def ratio_stderr(loss_sums: np.ndarray, tokens: np.ndarray) -> float:
    """Standard error of sum(loss_sums) / sum(tokens) with batches as the sampling units.

    The delta-method (cluster) variance of a ratio mean: batches, not tokens, are treated as
    independent, since tokens of one document are correlated. With equal token counts per batch it
    is the standard deviation of the batch means over sqrt(batches)."""
    n, total = len(tokens), tokens.sum()
    if total <= 0:
        return float("nan")
    mean = loss_sums.sum() / total
    residuals = loss_sums - mean * tokens
    return float(np.sqrt(n / (n - 1) * np.sum(residuals**2)) / total)


def eval_constants(setup: ModelSetup, data) -> Any:
    """The task's eval constants (bytes per token, ...) replicated on the mesh."""
    constants = setup.task.eval_constants(data)
    return jax.device_put(constants, NamedSharding(setup.mesh, P()))


@dataclasses.dataclass
class LoadedRun:
    cfg: Config
    setup: ModelSetup
    params: Any
    frozen: Any
    step: int

    @property
    def model(self):
        return self.setup.model


def reader_overrides(n_devices: int) -> list[str]:
    """A mesh any number of devices can hold for reading a run (parameters replicated, one row per
    device), whatever mesh it trained on, over the devices this process has (not the run's
    mesh.cpu_devices); a reader's own overrides (e.g. mesh.fsdp=-1) go after."""
    mesh = ["mesh.data=-1", "mesh.fsdp=1", "mesh.tensor=1", "mesh.expert=1", "mesh.cpu_devices=null"]
    return [*mesh, f"data.global_batch_size={n_devices}", "train.microbatches=1"]


def load_run(run_dir: Path, overrides: list[str] | tuple[str, ...] = (), devices: list | None = None,
             step: int | None = None) -> LoadedRun:
    """Config, model and the parameters of `run_dir`'s checkpoint at `step` (default: the latest)."""
    config_path = run_dir / "config.yaml"
    if not config_path.exists():
        raise CheckpointError(f"{run_dir} is not a run directory: config.yaml not found")
    cfg = load_config(config_path, overrides)
    if not (run_dir / "checkpoints").is_dir():
        raise CheckpointError(f"{run_dir} has no checkpoints/ folder; train it first")
    if devices is None:  # the mesh over all devices is made below, after the checkpointer has started JAX
        sharding.use_cpu_devices(cfg)
    checkpointer = Checkpointer(run_dir / "checkpoints", keep=cfg.train.keep_checkpoints, read_only=True)
    steps = checkpointer.all_steps()
    if not steps:
        checkpointer.close()
        raise CheckpointError(f"{run_dir} has no checkpoint yet (checkpoints/ is empty); train it first")
    if step is not None and step not in steps:
        checkpointer.close()
        raise CheckpointError(f"{run_dir} has no checkpoint of step {step}; it has steps {', '.join(map(str, steps))}")
    step = max(steps) if step is None else step
    setup = ModelSetup.build(cfg, devices)
    abstract = setup.factory.abstract()
    try:  # parameters (and a task's frozen state) only: readers have no use for the optimizer state
        params, frozen = checkpointer.restore_params(step, abstract.params, abstract.frozen)
    finally:
        checkpointer.close()
    return LoadedRun(cfg, setup, params, frozen, step)


def run_data(run: LoadedRun, run_dir: Path):
    """The run's task data, tokenized by the run's own tokenizer: with another one the loss would be
    meaningless."""
    return run.setup.task.build_data(replace(run.cfg, **{"data.tokenizer.path": str(run_dir / "tokenizer.model")}))


def evaluate_run(run_dir: Path, overrides: list[str] | tuple[str, ...] = (), batches: int | None = None,
                 step: int | None = None) -> dict[str, float]:
    if not (run_dir / "tokenizer.model").is_file() and (run_dir / "config.yaml").is_file():
        from lmjax.config_source import missing_tokenizer

        raise CheckpointError(missing_tokenizer(run_dir))
    run = load_run(run_dir, overrides, step=step)
    setup = run.setup
    data = run_data(run, run_dir)
    setup.task.prepare(data, setup, run.params, run_dir, fresh=False)
    n = batches or run.cfg.train.eval_batches
    eval_batches = [setup.global_batch(b) for b in data.eval_batches(n, jax.process_index(), jax.process_count())]
    with sharding.activate(setup.mesh, setup.rules):
        metrics = evaluate(setup.eval_step(), setup.task, run.params, run.frozen, eval_batches, eval_constants(setup, data))
    metrics["step"] = run.step
    if jax.process_index() == 0:
        print(json.dumps(metrics))
    return metrics
