"""Validation metrics, and loading a finished (or interrupted) run back from its directory.

`eval_metrics` is what the trainer logs as eval_loss / eval_ppl / eval_bpb; `lmjax eval RUN_DIR`
recomputes the same numbers from the latest checkpoint. Bits per byte divide the summed loss (in
bits) by the UTF-8 bytes the target tokens stand for, so runs with different tokenizers compare.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lmjax import sharding
from lmjax.config import Config, load_config, replace
from lmjax.errors import CheckpointError
from lmjax.models import build_model
from lmjax.train.checkpoint import Checkpointer
from lmjax.train.step import StateFactory


def eval_metrics(eval_step: Callable, params: Any, batches: list[dict], token_bytes: jax.Array) -> dict[str, float]:
    totals = {"loss_sum": 0.0, "tokens": 0.0, "bytes": 0.0}
    for batch in batches:
        sums = jax.device_get(eval_step(params, batch, token_bytes))
        totals = {k: totals[k] + float(sums[k]) for k in totals}
    loss = totals["loss_sum"] / max(totals["tokens"], 1.0)
    return {
        "eval_loss": loss,
        "eval_ppl": math.exp(min(loss, 50.0)),
        "eval_bpb": totals["loss_sum"] / math.log(2) / max(totals["bytes"], 1.0),
        "eval_tokens": totals["tokens"],
    }


def token_bytes_array(tokenizer, vocab_size: int, mesh: Mesh) -> jax.Array:
    """UTF-8 bytes per token id, padded to the model's vocabulary, replicated on the mesh."""
    table = np.zeros(vocab_size, np.float32)
    table[: len(tokenizer.token_bytes)] = tokenizer.token_bytes
    return jax.device_put(table, NamedSharding(mesh, P()))


@dataclasses.dataclass
class LoadedRun:
    cfg: Config
    model: nn.Module
    params: Any
    step: int
    mesh: Mesh
    rules: tuple
    factory: StateFactory


def load_run(run_dir: Path, overrides: list[str] | tuple[str, ...] = (), devices: list | None = None) -> LoadedRun:
    """Config, model and the latest checkpoint's parameters of `run_dir`."""
    config_path = run_dir / "config.yaml"
    if not config_path.exists():
        raise CheckpointError(f"{run_dir} is not a run directory: config.yaml not found")
    cfg = load_config(config_path, overrides)
    if not (run_dir / "checkpoints").is_dir():
        raise CheckpointError(f"{run_dir} has no checkpoints/ folder; train it first")
    checkpointer = Checkpointer(run_dir / "checkpoints", keep=cfg.train.keep_checkpoints, read_only=True)
    step = checkpointer.latest_step()
    if step is None:
        checkpointer.close()
        raise CheckpointError(f"{run_dir} has no checkpoint yet (checkpoints/ is empty); train it first")
    mesh = sharding.make_mesh(cfg, devices)
    rules = sharding.axis_rules(cfg)
    model = build_model(cfg.model)
    factory = StateFactory(cfg, model, mesh, rules)
    state, _ = checkpointer.restore(step, factory.abstract())
    checkpointer.close()
    return LoadedRun(cfg, model, state.params, step, mesh, rules, factory)


def evaluate_run(run_dir: Path, overrides: list[str] | tuple[str, ...] = (), batches: int | None = None) -> dict[str, float]:
    from lmjax.data import build_data
    from lmjax.train.step import make_eval_step

    run = load_run(run_dir, overrides)
    # The run's own tokenizer: evaluating with another one would make the loss meaningless.
    data = build_data(replace(run.cfg, **{"data.tokenizer.path": str(run_dir / "tokenizer.model")}))
    batch_sharding = sharding.batch_sharding(run.mesh, run.rules)
    n = batches or run.cfg.train.eval_batches
    eval_batches = [
        sharding.host_batch_to_global(b, batch_sharding)
        for b in data.eval_batches(n, jax.process_index(), jax.process_count())
    ]
    with sharding.activate(run.mesh, run.rules):
        eval_step = make_eval_step(run.model, run.factory, batch_sharding)
        metrics = eval_metrics(eval_step, run.params, eval_batches, token_bytes_array(data.tokenizer, run.cfg.model.vocab_size, run.mesh))
    metrics["step"] = run.step
    if jax.process_index() == 0:
        print(json.dumps(metrics))
    return metrics
