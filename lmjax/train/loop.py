"""The training loop: one function from a Config to a finished run directory.

run_dir/config.yaml    the resolved config (a rerun must match it: that is how resume works)
run_dir/metrics.jsonl  one JSON object per logged step and per evaluation
run_dir/summary.json   written when the run completes
run_dir/checkpoints/   orbax: train state + data-iterator state, every train.checkpoint_every steps

Running the same command again resumes from the latest checkpoint and continues the same loss
curve bit for bit. SIGTERM/SIGINT save a checkpoint and stop; a non-finite loss or gradient stops
the run, keeping the last good checkpoint.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import jax

import lmjax
from lmjax import flops, sharding
from lmjax.config import Config, ConfigError, config_yaml, load_yaml, replace, to_dict
from lmjax.data import build_data
from lmjax.errors import NonFiniteLossError
from lmjax.evaluate import eval_metrics, token_bytes_array
from lmjax.fileio import write_text_atomic
from lmjax.models import build_model
from lmjax.train.checkpoint import Checkpointer
from lmjax.train.metrics import MetricsLogger
from lmjax.train.optim import make_schedule
from lmjax.train.step import StateFactory, make_eval_step, make_train_step

# Keys a resumed run may change: they affect logging and bookkeeping, never the loss curve.
RESUMABLE_CHANGES = ("train.log_every", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints", "logging.")


class TrainingInterrupted(Exception):
    def __init__(self, step: int, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved, rerun the same command to resume")
        self.step, self.signum = step, signum


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def prepare_run_dir(cfg: Config, run_dir: Path) -> None:
    """Creates run_dir, or checks that one with progress holds the same run (so resuming is exact).

    A run directory without checkpoints or metrics (a run that failed before its first step) may
    be reused with a corrected config.
    """
    saved_path = run_dir / "config.yaml"
    has_progress = (run_dir / "metrics.jsonl").exists() or any((run_dir / "checkpoints").glob("[0-9]*"))
    if saved_path.exists() and has_progress:
        saved = _flatten(load_yaml(saved_path))
        current = _flatten(to_dict(cfg))
        for key in sorted(set(saved) | set(current)):
            if key == "run_dir" or key.startswith(RESUMABLE_CHANGES):
                continue
            old, new = saved.get(key), current.get(key)
            if old != new:
                raise ConfigError(
                    f"{run_dir} holds a run with {key}={old!r}, this config has {new!r}; "
                    f"use another run_dir, or the same config to resume"
                )
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir {run_dir} is a file; expected a directory (or a path that does not exist)")
    run_dir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        write_text_atomic(saved_path, config_yaml(cfg))


def _completed_summary(run_dir: Path, steps: int) -> dict[str, Any] | None:
    path = run_dir / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return summary if summary.get("status") == "completed" and summary.get("steps") == steps else None


class _StopSignal:
    """Turns SIGTERM/SIGINT into a flag checked between steps (a step is never cut in half)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _device_peak(dtype: str) -> tuple[float, str]:
    return flops.peak_flops_per_device(jax.devices()[0], dtype)


def train(cfg: Config, devices: list[jax.Device] | None = None) -> dict[str, Any]:
    """Trains (or resumes) the run described by `cfg` on `devices` (default: all); returns the summary."""
    wall_start = time.perf_counter()
    run_dir = Path(cfg.run_dir)
    mesh = sharding.make_mesh(cfg, devices)  # mesh and batch checks before any data or compile work
    rules = sharding.axis_rules(cfg)
    prepare_run_dir(cfg, run_dir)
    is_main = jax.process_index() == 0
    finished = _completed_summary(run_dir, cfg.train.steps)
    if finished is not None:  # also when checkpoints/ was deleted to save disk
        if is_main:
            print(f"{run_dir}: already complete ({cfg.train.steps} steps)")
        return finished

    # The run directory carries its tokenizer: a resumed run (and eval/generate) reuse that file,
    # so a cache wipe or a sentencepiece upgrade can never change the tokens mid-run.
    run_tokenizer = run_dir / "tokenizer.model"
    data = build_data(replace(cfg, **{"data.tokenizer.path": str(run_tokenizer)}) if run_tokenizer.exists() else cfg)
    if is_main and not run_tokenizer.exists():
        shutil.copyfile(data.tokenizer.path, run_tokenizer)
    model = build_model(cfg.model)
    factory = StateFactory(cfg, model, mesh, rules)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    checkpointer = Checkpointer(run_dir / "checkpoints", keep=cfg.train.keep_checkpoints)

    counts = flops.param_counts(cfg.model)
    seq_len, batch_size, steps = cfg.data.seq_len, cfg.data.global_batch_size, cfg.train.steps
    flops_per_token = flops.flops_per_token(cfg.model, seq_len)  # Chinchilla count: budgets, summary
    model_flops_per_token = flops.model_flops_per_token(cfg.model, seq_len)  # matmul FLOPs: TFLOP/s, MFU
    tokens_per_step = batch_size * seq_len
    peak, peak_source = _device_peak(cfg.model.dtype)
    n_devices = mesh.devices.size
    schedule = make_schedule(cfg)
    token_bytes = token_bytes_array(data.tokenizer, cfg.model.vocab_size, mesh)

    train_iter = data.train_iterator(jax.process_index(), jax.process_count())
    latest = checkpointer.latest_step()
    elapsed_before = 0.0
    if latest is not None:
        state, data_state = checkpointer.restore(latest, factory.abstract())
        train_iter.set_state(data_state["iterator"])
        elapsed_before = float(data_state.get("wall_time_s", 0.0))
    else:
        state = factory.create(cfg.seed)
    start_step = int(jax.device_get(state.step))

    summary_path = run_dir / "summary.json"

    if is_main:
        shape = " x ".join(f"{k}={v}" for k, v in mesh.shape.items())
        print(
            f"lmjax {lmjax.__version__} | {counts['total']:,} params ({counts['non_embedding']:,} non-embedding) | "
            f"mesh {shape} on {n_devices} {jax.devices()[0].platform} device(s) | "
            f"{data.stats['tokens']['train']:,} train tokens | "
            + (f"resuming at step {start_step}" if start_step else f"{steps} steps of {tokens_per_step:,} tokens")
        )

    train_step = make_train_step(cfg, model, factory, batch_sharding)
    eval_step = make_eval_step(model, factory, batch_sharding)
    eval_batches = [
        sharding.host_batch_to_global(b, batch_sharding)
        for b in data.eval_batches(cfg.train.eval_batches, jax.process_index(), jax.process_count())
    ]
    logger = MetricsLogger(cfg, run_dir, start_step, steps)

    def evaluate(step: int) -> dict[str, float]:
        record = {"step": step, **eval_metrics(eval_step, state.params, eval_batches, token_bytes)}
        logger.log(record)
        return record

    window = {"time": None, "step": start_step}
    last = {"loss": None, "eval": None, "tokens_per_sec": None}

    def finalize(step: int, metrics: Any) -> None:
        """Pulls step `step`'s metrics to the host (one step late: the device never waits)."""
        m = jax.device_get(metrics)
        loss, grad_norm, param_norm = float(m["loss"]), float(m["grad_norm"]), float(m["param_norm"])
        # The updated parameters too: a checkpoint is only as good as the weights it holds.
        if not (math.isfinite(loss) and math.isfinite(grad_norm) and math.isfinite(param_norm)):
            good = checkpointer.latest_step()
            kept = f"last good checkpoint: step {good} in {checkpointer.directory}" if good is not None else "no checkpoint was saved"
            raise NonFiniteLossError(
                f"non-finite loss ({loss}), grad norm ({grad_norm}) or parameter norm ({param_norm}) at step {step}; {kept}"
            )
        last["loss"] = loss
        now = time.perf_counter()
        if step % cfg.train.log_every == 0 or step == steps:
            record = {
                "step": step,
                "loss": loss,
                "z_loss": float(m["z_loss"]),
                "lr": float(schedule(step - 1)),
                "grad_norm": grad_norm,
                "param_norm": param_norm,
                "tokens": step * tokens_per_step,
            }
            # Objective-specific metrics (e.g. moe/...): scalars as numbers, vectors as lists.
            record.update({k: v.tolist() for k, v in m.items() if k not in ("loss", "z_loss", "grad_norm", "param_norm", "target_tokens")})
            # Throughput once the first (compiling) step is behind; null until then.
            record.update(tokens_per_sec=None, tflops_per_sec=None, mfu=None, step_time_s=None)
            if window["time"] is not None:
                seconds = now - window["time"]
                tokens_per_sec = (step - window["step"]) * tokens_per_step / seconds
                last["tokens_per_sec"] = tokens_per_sec
                record.update(
                    tokens_per_sec=tokens_per_sec,
                    tflops_per_sec=tokens_per_sec * model_flops_per_token / 1e12,
                    mfu=flops.mfu(tokens_per_sec / n_devices, model_flops_per_token, peak),
                    step_time_s=seconds / (step - window["step"]),
                )
            logger.log(record)
        if window["time"] is None or step % cfg.train.log_every == 0:
            window.update(time=now, step=step)
        logger.progress(step, loss, last["tokens_per_sec"])

    def save(step: int) -> None:
        wall = elapsed_before + time.perf_counter() - wall_start
        checkpointer.save(step, state, {"iterator": train_iter.get_state(), "wall_time_s": wall})

    pending = None
    step = start_step
    try:
        with _StopSignal() as stop, sharding.activate(mesh, rules):
            while step < steps:
                batch = sharding.host_batch_to_global(next(train_iter), batch_sharding)
                state, metrics = train_step(state, batch)
                step += 1
                if pending is not None:
                    finalize(*pending)
                pending = (step, metrics)
                at_checkpoint = step % cfg.train.checkpoint_every == 0 or step == steps
                at_eval = step == steps or (cfg.train.eval_every and step % cfg.train.eval_every == 0)
                if at_checkpoint or at_eval or stop.signum is not None:
                    finalize(*pending)  # never checkpoint a state whose loss was not checked
                    pending = None
                if at_eval:
                    last["eval"] = evaluate(step)
                if at_checkpoint or stop.signum is not None:
                    save(step)
                if stop.signum is not None and step < steps:
                    checkpointer.wait()
                    raise TrainingInterrupted(step, stop.signum)
            if last["eval"] is None:  # resumed from the final checkpoint of a run killed before its summary
                last["eval"] = evaluate(step)
            checkpointer.wait()
    except BaseException:
        logger.close()
        raise
    finally:
        checkpointer.close()
        train_iter.close()

    wall_time = elapsed_before + time.perf_counter() - wall_start
    summary = {
        "status": "completed",
        "steps": steps,
        "final_train_loss": last["loss"],
        "final_eval_loss": last["eval"]["eval_loss"],
        "final_eval_ppl": last["eval"]["eval_ppl"],
        "final_eval_bpb": last["eval"]["eval_bpb"],
        "params_total": counts["total"],
        "params_non_embedding": counts["non_embedding"],
        "params_embedding": counts["embedding"],
        "params_output_head": counts["output_head"],
        "params_active": counts["active"],
        "tokens": steps * tokens_per_step,
        "flops_per_token": flops_per_token,
        "train_flops": flops_per_token * steps * tokens_per_step,
        "tokens_per_sec": last["tokens_per_sec"],
        "peak_flops_per_device": peak,
        "peak_flops_source": peak_source,
        "devices": n_devices,
        "wall_time_s": wall_time,
        "corpus_fingerprint": data.fingerprint,
        "data_skipped": data.stats["skipped"],
        "model_flops_per_token": model_flops_per_token,
        "tokenizer": str(data.tokenizer.path),
        "lmjax_version": lmjax.__version__,
        "jax_version": jax.__version__,
    }
    if is_main:
        write_text_atomic(summary_path, json.dumps(summary, indent=2) + "\n")
        logger.write_summary(summary)
    logger.close()
    if is_main:
        print(
            f"done: eval loss {summary['final_eval_loss']:.4f}, {summary['final_eval_bpb']:.4f} bits/byte, "
            f"{summary['tokens']:,} tokens in {wall_time:.1f}s -> {run_dir}"
        )
    return summary
