"""The training loop: from a Config to a finished run directory, for every task.

run_dir/config.yaml    the resolved config (a rerun must match it: that is how resume works)
run_dir/metrics.jsonl  one JSON object per logged step and per evaluation
run_dir/summary.json   written when the run completes
run_dir/checkpoints/   orbax: train state + data-iterator state, every train.checkpoint_every steps

Running the same command again resumes from the latest checkpoint and continues the same loss
curve bit for bit. SIGTERM/SIGINT save a checkpoint and stop; a non-finite loss or gradient stops
the run, keeping the last good checkpoint.

`Trainer` reads top to bottom: setup (`__init__`), `run` = data, restore or init, the loop
(`_train_steps`), with `_check_and_log` (metrics one step late), `evaluate` and `save`, then
`_finish` (the summary). What differs between tasks lives in `lmjax.tasks`.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import jax

import lmjax
from lmjax import distributed, flops, sharding
from lmjax.config import Config, ConfigError, build, config_yaml, flatten_dotted, load_yaml, replace, to_dict
from lmjax.errors import CheckpointError, NonFiniteLossError
from lmjax.evaluate import eval_constants, evaluate
from lmjax.fileio import read_completed_summary, write_json_atomic, write_text_atomic
from lmjax.host_memory import release_free_heap
from lmjax.tasks import Task
from lmjax.train.checkpoint import Checkpointer
from lmjax.train.init_from import load_source_params
from lmjax.train.metrics import MetricsLogger
from lmjax.train.optim import make_schedule
from lmjax.train.run_lock import RunLock
from lmjax.train.step import ModelSetup, compile_train_step, make_stop_flags, make_stop_vote

# Keys a resumed run may change. Logging and bookkeeping; where it runs (the mesh, micro-batches:
# the global batch and its order are the same on any of them, so the loss curve continues to
# float precision); and train.steps, raised to extend a run (the schedule is then the new one).
RESUMABLE_CHANGES = ("train.log_every", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints", "logging.",
                     "mesh.", "train.microbatches", "train.peer_timeout_s", "train.steps",
                     "train.final_eval_tokens")


def seconds_since_process_start() -> float | None:
    """Seconds since this process started (Linux: /proc), imports and start-up included; None elsewhere."""
    try:
        with open("/proc/self/stat") as f:  # field 22, after the parenthesised command name: start time in clock ticks
            started = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime") as f:
            return float(f.read().split()[0]) - started
    except (OSError, ValueError, IndexError, AttributeError):
        return None

class TrainingInterrupted(Exception):
    def __init__(self, step: int, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved, rerun the same command to resume")
        self.step, self.signum = step, signum


def prepare_run_dir(cfg: Config, run_dir: Path) -> None:
    """Creates run_dir, or checks that one with progress holds the same run (so resuming is exact).

    A run directory without checkpoints or metrics (a run that failed before its first step) may
    be reused with a corrected config.
    """
    saved_path = run_dir / "config.yaml"
    if (run_dir / "imported.json").exists():
        raise ConfigError(f"run_dir {run_dir} holds weights imported by `lmjax import-hf`, not a training run; "
                          f"train from them in a new run: train.init_from={run_dir} run_dir=NEW_DIR")
    has_progress = (run_dir / "metrics.jsonl").exists() or any((run_dir / "checkpoints").glob("[0-9]*"))
    if saved_path.exists() and has_progress:
        # Through the config builder: keys added to lmjax since the run started take their defaults.
        saved = flatten_dotted(to_dict(build(Config, load_yaml(saved_path))))
        current = flatten_dotted(to_dict(cfg))
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


def train(cfg: Config, devices: list[jax.Device] | None = None, task: Task | None = None) -> dict[str, Any]:
    """Trains (or resumes) the run described by `cfg` on `devices` (default: all); returns the summary.

    `task` replaces the one `train.objective` names (tests use it for toy tasks)."""
    trainer = Trainer(cfg, devices, task)  # every check of the config, before anything is written
    with RunLock(cfg.run_dir):  # process 0 holds it from before anything is written to the end
        return trainer.run()


class Trainer:
    def __init__(self, cfg: Config, devices: list[jax.Device] | None = None, task: Task | None = None):
        self.wall_start = time.perf_counter()
        self.cfg, self.run_dir = cfg, Path(cfg.run_dir)
        self.setup = ModelSetup.build(cfg, devices, task)  # mesh and shape checks before any data or compile work
        self.is_main = jax.process_index() == 0
        self.steps, task = cfg.train.steps, self.setup.task
        self.tokens_per_step = cfg.data.global_batch_size * task.tokens_per_row()
        self.counts = flops.param_counts(cfg.model)
        lengths = (cfg.data.seq_len, task.decoder_len())
        self.flops_per_token = flops.flops_per_token(cfg.model, *lengths)  # Chinchilla count: budgets, summary
        self.model_flops_per_token = flops.model_flops_per_token(cfg.model, *lengths, task.forward_passes())  # matmul FLOPs: TFLOP/s, MFU
        self.peak, self.peak_source = flops.peak_flops_per_device(jax.devices()[0], cfg.model.dtype, quick=True)
        self.schedule = make_schedule(cfg)
        self.train_step = self.setup.train_step()  # compiled ahead of time at the first batch (`_train_steps`)
        self.eval_step = self.setup.eval_step()  # compiled at first call
        self.stop_vote = make_stop_vote(self.setup.mesh)
        # Bookkeeping of the loop (set by run()).
        self.checkpointer = self.state = self.data = self.train_iter = self.eval_batches = self.eval_constants = self.logger = None
        self.elapsed_before = 0.0
        self.init_from_step = None  # the source checkpoint's step of a `train.init_from` run
        self.last_loss = self.last_eval = self.last_tokens_per_sec = None
        self.time_to_first_step = None  # process start to the first step's loss on the host
        self.stop_signal = 0  # the signal (SIGTERM, SIGINT) some process received, once all know it
        self.window_time, self.window_step = None, 0

    # ------------------------------------------------------------------ the run
    def run(self) -> dict[str, Any]:
        """Under the run directory's lock (`train`): nothing is written before the config passed
        every check (in __init__), and never by two runs at once."""
        self._check_steps()
        prepare_run_dir(self.cfg, self.run_dir)
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", keep=self.cfg.train.keep_checkpoints)
        finished = read_completed_summary(self.run_dir, self.steps)
        if finished is not None:  # also when checkpoints/ was deleted to save disk
            if self.is_main:
                print(f"{self.run_dir}: already complete ({self.steps} steps)")
            self.checkpointer.close()
            return finished
        self._load_data()
        start_step, iterator_state = self._restore_or_init()
        self._prepare_task(start_step, iterator_state)
        self._announce(start_step)
        self.logger = MetricsLogger(self.cfg, self.run_dir, start_step, self.steps)
        self.window_step = start_step
        try:
            self._train_steps(start_step)
        except BaseException:
            self.logger.close()
            raise
        finally:
            self.checkpointer.close()
            self.train_iter.close()
        return self._finish()

    def _check_steps(self) -> None:
        """train.steps may be raised to extend a run (the schedule is then the new config's), not
        lowered below its latest checkpoint; a completed run extends from its last checkpoint.
        Checked before anything (config.yaml) is written."""
        folder = self.run_dir / "checkpoints"
        steps = [int(p.name) for p in folder.glob("[0-9]*") if p.name.isdigit() and p.is_dir()] if folder.is_dir() else []
        latest = max(steps, default=None)
        if latest is not None and latest > self.steps:
            raise ConfigError(f"train.steps={self.steps} is below step {latest} of the latest checkpoint in "
                              f"{folder}; expected train.steps >= {latest} (raise it to extend the run)")
        finished = read_completed_summary(self.run_dir)
        if latest is None and finished is not None and finished.get("steps") != self.steps:
            raise CheckpointError(f"{self.run_dir} holds a completed run without checkpoints; it cannot be extended to "
                                  f"train.steps={self.steps} (extend a run that kept its checkpoints, or use a new run_dir)")

    def _load_data(self) -> None:
        # The run directory carries its tokenizer: a resumed run (and eval/generate) reuse that file,
        # so a cache wipe or a sentencepiece upgrade can never change the tokens mid-run.
        run_tokenizer = self.run_dir / "tokenizer.model"
        cfg = replace(self.cfg, **{"data.tokenizer.path": str(run_tokenizer)}) if run_tokenizer.exists() else self.cfg
        with distributed.process_zero_first("data"):  # the others find its tokenizer and tokens in the cache
            self.data = self.setup.task.build_data(cfg)
        if self.is_main and not run_tokenizer.exists():
            shutil.copyfile(self.data.tokenizer.path, run_tokenizer)
        self.eval_constants = eval_constants(self.setup, self.data)

    def _prepare_task(self, start_step: int, iterator_state: dict | None) -> None:
        """The task's data computed from the initial parameters (kept in the run), then the batch
        iterators, whose rows may carry it."""
        self.setup.task.prepare(self.data, self.setup, self.state.params, self.run_dir, fresh=start_step == 0)
        self.train_iter = self.data.train_iterator(jax.process_index(), jax.process_count())
        if iterator_state is not None:
            self.train_iter.set_state(iterator_state)
        host_eval = self.data.eval_batches(self.cfg.train.eval_batches, jax.process_index(), jax.process_count())
        self.eval_batches = [self.setup.global_batch(b) for b in host_eval]

    def _restore_or_init(self) -> tuple[int, dict | None]:
        """(the step the run continues from, the data iterator's state when resumed)."""
        restored, iterator_state = self.checkpointer.restore_latest(self.setup.factory.abstract()), None
        if restored is None and self.cfg.train.init_from:
            params, self.init_from_step = load_source_params(self.cfg, self.setup)
            self.state = self.setup.factory.create(self.cfg.seed, params)
            if self.is_main:
                print(f"initialised from {self.cfg.train.init_from} (step {self.init_from_step})")
        elif restored is None:
            self.state = self.setup.factory.create(self.cfg.seed)
        else:
            _, self.state, data_state = restored
            iterator_state = data_state["iterator"]
            self.elapsed_before = float(data_state.get("wall_time_s", 0.0))
            self.init_from_step = data_state.get("init_from_step")
        return int(jax.device_get(self.state.step)), iterator_state

    def _announce(self, start_step: int) -> None:
        if not self.is_main:
            return
        mesh = self.setup.mesh
        shape = " x ".join(f"{k}={v}" for k, v in mesh.shape.items())
        print(
            f"lmjax {lmjax.__version__} | {self.cfg.model.family} {self.setup.task.name} | "
            f"{self.counts['total']:,} params ({self.counts['non_embedding']:,} non-embedding) | "
            f"mesh {shape} on {mesh.devices.size} {jax.devices()[0].platform} device(s) | "
            f"{self.data.stats['tokens']['train']:,} train tokens | "
            + (f"resuming at step {start_step}" if start_step else f"{self.steps} steps of {self.tokens_per_step:,} tokens")
        )
        overlong = self.data.stats.get("overlong", {})  # examples longer than a row (seq2seq, SFT)
        if any(any(counts.values()) for counts in overlong.values()):
            print("examples longer than a row: " + "; ".join(
                f"{split} {', '.join(f'{n:,} {what}' for what, n in counts.items())}" for split, counts in overlong.items()
            ))

    def _train_steps(self, step: int) -> None:
        """Steps until train.steps or an agreed stop. Every decision here is the same on every
        process: a signal reaches the others through `stop_vote` (each process feeds its own flag
        in, every step, pulled with the step's metrics), a non-finite loss and the schedule of evals and saves are read from
        replicated values, and the data never ends (the iterator repeats)."""
        every = self.cfg.train
        pending = None  # (step, metrics) not yet pulled to the host
        no_signal = make_stop_flags(self.setup.mesh, None)  # built once: no host-to-device copy per step
        compiled_step = None  # `self.train_step` compiled for the first batch's shapes, which every batch has
        with _StopSignal() as stop, sharding.activate(self.setup.mesh, self.setup.rules):
            while step < self.steps:
                batch = self.setup.global_batch(next(self.train_iter))
                if compiled_step is None:
                    compiled_step = compile_train_step(self.train_step, self.state, batch)
                self.state, metrics = compiled_step(self.state, batch)
                flags = no_signal if stop.signum is None else make_stop_flags(self.setup.mesh, stop.signum)
                metrics["stop_signal"] = self.stop_vote(flags)
                step += 1
                if pending is not None:
                    self._check_and_log(*pending)
                pending = (step, metrics)
                at_checkpoint = step % every.checkpoint_every == 0 or step == self.steps
                at_eval = step == self.steps or (every.eval_every and step % every.eval_every == 0)
                if at_checkpoint or at_eval or self.stop_signal:
                    self._check_and_log(*pending)  # never checkpoint a state whose loss was not checked
                    pending = None
                if at_eval:
                    self.evaluate(step)
                if at_checkpoint or self.stop_signal:
                    self.save(step)
                if self.stop_signal and step < self.steps:
                    self.checkpointer.wait()
                    raise TrainingInterrupted(step, self.stop_signal)
            if self.last_eval is None:  # resumed from the final checkpoint of a run killed before its summary
                self.evaluate(step)
            self.checkpointer.wait()

    # ------------------------------------------------------------------ per step
    def _check_and_log(self, step: int, metrics: Any) -> None:
        """Pulls step `step`'s metrics to the host (one step late: the device never waits), stops
        on a non-finite value, logs every `train.log_every` steps."""
        m = jax.device_get(metrics)
        self.stop_signal = self.stop_signal or int(m.pop("stop_signal"))  # a signal on any process
        loss, grad_norm, param_norm = float(m["loss"]), float(m["grad_norm"]), float(m["param_norm"])
        # The updated parameters too: a checkpoint is only as good as the weights it holds.
        if not (math.isfinite(loss) and math.isfinite(grad_norm) and math.isfinite(param_norm)):
            good = self.checkpointer.latest_step()
            kept = f"last good checkpoint: step {good} in {self.checkpointer.directory}" if good is not None else "no checkpoint was saved"
            raise NonFiniteLossError(
                f"non-finite loss ({loss}), grad norm ({grad_norm}) or parameter norm ({param_norm}) at step {step}; {kept}"
            )
        self.last_loss = loss
        if self.time_to_first_step is None:
            self.time_to_first_step = seconds_since_process_start()
        now = time.perf_counter()
        if step % self.cfg.train.log_every == 0 or step == self.steps:
            record = {
                "step": step,
                "loss": loss,
                "lr": float(self.schedule(step - 1)),
                "grad_norm": grad_norm,
                "param_norm": param_norm,
                "tokens": step * self.tokens_per_step,
            }
            # Task metrics (z_loss, mlm_accuracy, moe/...): scalars as numbers, vectors as lists.
            record.update({k: v.tolist() for k, v in m.items() if k not in record and not k.startswith("target_")})
            record.update(self._throughput(step, now))
            self.logger.log(record)
        if self.window_time is None or step % self.cfg.train.log_every == 0:
            self.window_time, self.window_step = now, step
        self.logger.progress(step, loss, self.last_tokens_per_sec)

    def _throughput(self, step: int, now: float) -> dict[str, float | None]:
        """Tokens/s, TFLOP/s and MFU since the last logged step; null until the first (compiling)
        step is behind."""
        if self.window_time is None:
            return {"tokens_per_sec": None, "tflops_per_sec": None, "mfu": None, "step_time_s": None}
        seconds = now - self.window_time
        tokens_per_sec = (step - self.window_step) * self.tokens_per_step / seconds
        self.last_tokens_per_sec = tokens_per_sec
        return {
            "tokens_per_sec": tokens_per_sec,
            "tflops_per_sec": tokens_per_sec * self.model_flops_per_token / 1e12,
            "mfu": flops.mfu(tokens_per_sec / self.setup.mesh.devices.size, self.model_flops_per_token, self.peak),
            "step_time_s": seconds / (step - self.window_step),
        }

    def evaluate(self, step: int) -> None:
        batches = self.eval_batches
        if step == self.steps and self.cfg.train.final_eval_tokens:
            batches = self._final_eval_batches()
        metrics = evaluate(self.eval_step, self.setup.task, self.state.params, self.state.frozen, batches, self.eval_constants)
        release_free_heap()  # the eval step's compile (the first eval) leaves memory as the train step's does
        self.last_eval = {"step": step, **metrics}
        self.logger.log(self.last_eval)

    def _final_eval_batches(self):
        """train.final_eval_tokens worth of validation batches, at most the whole split, made as they are read."""
        n = min(math.ceil(self.cfg.train.final_eval_tokens / self.tokens_per_step), self.data.validation_batches())
        for host_batch in self.data.eval_batches(n, jax.process_index(), jax.process_count()):
            yield self.setup.global_batch(host_batch)  # one batch on the devices at a time

    def save(self, step: int) -> None:
        wall = self.elapsed_before + time.perf_counter() - self.wall_start
        data_state = {"iterator": self.train_iter.get_state(), "wall_time_s": wall}
        if self.init_from_step is not None:  # which source checkpoint the run started from, kept across resumes
            data_state["init_from_step"] = self.init_from_step
        self.checkpointer.save(step, self.state, data_state)

    # ------------------------------------------------------------------ the end
    def _finish(self) -> dict[str, Any]:
        wall_time = self.elapsed_before + time.perf_counter() - self.wall_start
        counts, tokens = self.counts, self.steps * self.tokens_per_step
        final_eval = {f"final_{k}": v for k, v in self.last_eval.items() if k.startswith("eval_")}
        summary = {
            "status": "completed",
            "steps": self.steps,
            "model_family": self.cfg.model.family,
            "objective": self.setup.task.name,
            "final_train_loss": self.last_loss,
            **final_eval,
            "params_total": counts["total"],
            "params_non_embedding": counts["non_embedding"],
            "params_embedding": counts["embedding"],
            "params_output_head": counts["output_head"],
            "params_active": counts["active"],
            "tokens": tokens,
            "flops_per_token": self.flops_per_token,
            "train_flops": self.flops_per_token * tokens,
            "tokens_per_sec": self.last_tokens_per_sec,
            "peak_flops_per_device": self.peak,
            "peak_flops_source": self.peak_source,
            "devices": self.setup.mesh.devices.size,
            "wall_time_s": wall_time,
            "time_to_first_step_s": self.time_to_first_step,
            "corpus_fingerprint": self.data.fingerprint,
            "data_skipped": self.data.stats["skipped"],
            **({"data_overlong": self.data.stats["overlong"]} if "overlong" in self.data.stats else {}),
            **({"init_from": self.cfg.train.init_from, "init_from_step": self.init_from_step} if self.cfg.train.init_from else {}),
            "model_flops_per_token": self.model_flops_per_token,
            "tokenizer": str(self.data.tokenizer.path),
            "lmjax_version": lmjax.__version__,
            "jax_version": jax.__version__,
        }
        if self.is_main:
            write_json_atomic(self.run_dir / "summary.json", summary)
            self.logger.write_summary(summary)
        self.logger.close()
        if self.is_main:
            stderr = f" ± {final_eval['final_eval_loss_stderr']:.4f}" if "final_eval_loss_stderr" in final_eval else ""
            extra = "".join(f", {k.removeprefix('final_eval_')} {v:.4f}" for k, v in final_eval.items()
                            if k not in ("final_eval_loss", "final_eval_loss_stderr", "final_eval_tokens"))
            print(
                f"done: eval loss {summary['final_eval_loss']:.4f}{stderr}{extra}, "
                f"{tokens:,} tokens in {wall_time:.1f}s -> {self.run_dir}"
            )
        return summary
