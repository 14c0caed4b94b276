"""`lmjax sweep SWEEP.yaml`: write the plan, run every run, fit, and optionally check a prediction.

sweep_dir/plan.json      the plan (`plan.py`); a rerun must plan exactly the same runs
sweep_dir/runs/<name>/   ordinary `lmjax train` run directories (+ train.log with their output)
sweep_dir/fit.json, report.md, *.png          the fit of every finished run (`report.run_fit`)
sweep_dir/holdout/, sweep_dir/prediction.json with predict.holdout_largest=true

Rerunning the command skips finished runs (summary.json with status "completed") and hands the
rest to the executor; `lmjax train` resumes an interrupted run from its last checkpoint by itself.
Executors only run runs: planning, bookkeeping and fitting stay here, so a cluster executor
(one job per run) is one more `Executor` subclass.
"""

from __future__ import annotations

import abc
import csv
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from lmjax.config import ConfigError, load_config, save_config, to_dict
from lmjax.errors import UserError
from lmjax.fileio import read_completed_summary, write_json_atomic
from lmjax.scaling.plan import PlannedRun, SweepPlan, format_number, format_table, load_sweep, plan_sweep

CHILD_SHUTDOWN_SECONDS = 120  # after Ctrl-C, time a training subprocess gets to save its checkpoint


class SweepError(UserError):
    """A sweep directory that cannot be used as asked."""


# ----------------------------------------------------------------------------- executors


class Executor(abc.ABC):
    """Runs planned runs whose config.yaml is already in their run directory."""

    @abc.abstractmethod
    def execute(self, runs: Sequence[PlannedRun]) -> dict[str, str]:
        """Runs every run to its end; returns {run name: why it failed} for the runs that failed.

        A failed run must not stop the others. Ctrl-C (KeyboardInterrupt) stops the sweep.
        """


def _announce(i: int, n: int, run: PlannedRun) -> float:
    print(f"[{i}/{n}] {run.name}: {run.steps} steps, {run.tokens:,} tokens ({run.run_dir}/train.log)", flush=True)
    return time.perf_counter()


def _report_done(run: PlannedRun, start: float) -> None:
    summary = read_completed_summary(run.run_dir)
    loss = f", eval loss {summary['final_eval_loss']:.4f}" if summary else ""
    print(f"      done in {time.perf_counter() - start:.0f}s{loss}", flush=True)


class LocalExecutor(Executor):
    """One run after another, each in its own `python -m lmjax.cli train RUN_DIR/config.yaml` process.

    A subprocess per run isolates crashes (and memory) of one run from the others; its output goes
    to RUN_DIR/train.log (appended across attempts).
    """

    def __init__(self, python: str = sys.executable):
        self.python = python

    def execute(self, runs: Sequence[PlannedRun]) -> dict[str, str]:
        failures = {}
        for i, run in enumerate(runs, start=1):
            start = _announce(i, len(runs), run)
            rc = self._train(run)
            if rc == 0:
                _report_done(run, start)
            else:
                failures[run.name] = f"exit code {rc}: {_last_line(run.run_dir / 'train.log')}"
                print(f"      failed: {failures[run.name]}", flush=True)
        return failures

    def _train(self, run: PlannedRun) -> int:
        command = [self.python, "-m", "lmjax.cli", "train", str(run.run_dir / "config.yaml")]
        with open(run.run_dir / "train.log", "a") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
            try:
                return process.wait()
            except KeyboardInterrupt:
                # Let the run save a checkpoint and stop between steps (the trainer handles SIGINT).
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(timeout=CHILD_SHUTDOWN_SECONDS)
                except subprocess.TimeoutExpired:
                    process.kill()
                raise


class InProcessExecutor(Executor):
    """One run after another in this process (`lmjax.train.loop.train`) on `devices` (default: all):
    no start-up cost per run, but a run that crashes the interpreter stops the sweep."""

    def __init__(self, devices: list | None = None):
        self.devices = devices

    def execute(self, runs: Sequence[PlannedRun]) -> dict[str, str]:
        from lmjax.train.loop import TrainingInterrupted, train

        failures = {}
        for i, run in enumerate(runs, start=1):
            start = _announce(i, len(runs), run)
            try:
                train(run.config, devices=self.devices)
            except TrainingInterrupted:
                raise KeyboardInterrupt from None
            except Exception as err:  # a failed run is reported at the end; the others go on
                failures[run.name] = f"{type(err).__name__}: {err}"
                print(f"      failed: {failures[run.name]}", flush=True)
                continue
            _report_done(run, start)
        return failures


def _last_line(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no output"
    return lines[-1][:300] if lines else "no output"


# ----------------------------------------------------------------------------- the sweep directory


def first_difference(old: Any, new: Any, path: str = "") -> str | None:
    """Where two JSON trees differ first, as 'path: old -> new', or None if they are equal."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            if key not in old or key not in new:
                before, after = (repr(tree[key]) if key in tree else "missing" for tree in (old, new))
                return f"{path}{key}: {before} -> {after}"
            found = first_difference(old[key], new[key], f"{path}{key}.")
            if found:
                return found
        return None
    if isinstance(old, list) and isinstance(new, list):
        for i, (a, b) in enumerate(zip(old, new)):
            found = first_difference(a, b, f"{path.rstrip('.')}[{i}].")
            if found:
                return found
        if len(old) != len(new):
            return f"{path.rstrip('.')}: {len(old)} entries -> {len(new)}"
        return None
    return None if old == new else f"{path.rstrip('.')}: {old!r} -> {new!r}"


def plan_difference(plan: SweepPlan) -> str | None:
    """How plan.json in the sweep directory differs from `plan` (None: absent or identical)."""
    path = plan.sweep_dir / "plan.json"
    if not path.exists():
        return None
    try:
        existing = json.loads(path.read_text())
    except ValueError:
        raise SweepError(f"{path} is not valid JSON; move it away to start the sweep afresh") from None
    # What happens after the runs (fit settings, the held-out prediction) may change on a rerun:
    # `lmjax sweep S.yaml predict.holdout_largest=true` on a finished sweep only adds the prediction.
    after_runs = ("predict", "fit")
    planned = {k: v for k, v in json.loads(json.dumps(plan.to_json())).items() if k not in after_runs}
    return first_difference({k: v for k, v in existing.items() if k not in after_runs}, planned)


def write_plan(plan: SweepPlan) -> Path:
    """Writes plan.json, or checks that the one there is the same plan (never overwrites another)."""
    path = plan.sweep_dir / "plan.json"
    difference = plan_difference(plan)
    if difference:
        raise SweepError(f"{path} holds a different plan ({difference}); use another sweep_dir, "
                         "or the sweep config and overrides that made it")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, plan.to_json(), indent=1)
    return path


def write_run_config(run: PlannedRun) -> None:
    """Writes the run's config.yaml, or checks that the one there is the planned config."""
    path = run.run_dir / "config.yaml"
    if path.exists():
        difference = first_difference(to_dict(load_config(path)), to_dict(run.config))
        if difference:
            raise ConfigError(f"{path} differs from the plan ({difference}); restore it or delete the run directory")
        return
    run.run_dir.mkdir(parents=True, exist_ok=True)
    save_config(run.config, path)


def run_sweep(plan: SweepPlan, executor: Executor) -> dict[str, str]:
    """Runs every unfinished run; returns {run name: why it failed} (the files decide what finished)."""
    pending, failures = [], {}
    for run in plan.runs:
        if read_completed_summary(run.run_dir) is not None:
            continue
        try:
            write_run_config(run)
        except ConfigError as err:
            failures[run.name] = str(err)
            continue
        pending.append(run)
    finished = len(plan.runs) - len(pending) - len(failures)
    if finished:
        print(f"{finished} of {len(plan.runs)} runs already finished: skipped")
    reasons = executor.execute(pending) if pending else {}
    for run in pending:
        if read_completed_summary(run.run_dir) is None:
            failures[run.name] = reasons.get(run.name, "no completed summary.json after the run")
    return failures


# ----------------------------------------------------------------------------- fit and prediction


def print_fit(fit: dict, out_dir: Path) -> None:
    from lmjax.scaling.plots import PLOT_NAMES
    from lmjax.scaling.report import format_estimate

    print(f"fit ({fit['n_runs']} runs, N = {fit['param_convention']} parameters): {out_dir / 'fit.json'}")
    for label, part in (("Approach 3 (parametric)", fit["approach3"]), ("Approach 2 (IsoFLOP)", fit["isoflop"])):
        if "skipped" in part:
            print(f"  {label:<23}: skipped ({part['skipped']})")
            continue
        line = f"  {label:<23}: a = {format_estimate(part['a'])}, b = {format_estimate(part['b'])}"
        if "tokens_per_param" in part:
            line += f", tokens per parameter at the largest budget = {format_estimate(part['tokens_per_param'])}"
        print(line)
    print(f"  plot: {out_dir / PLOT_NAMES[0]} (also {', '.join(PLOT_NAMES[1:])}); report: {out_dir / 'report.md'}")


def _write_runs_csv(path: Path, runs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    numbers = ("params", "tokens", "loss", "flops", "budget", "lr")
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("name", *numbers))
        for run in runs:  # repr: floats read back exactly; empty: an optional value the run lacks
            writer.writerow([run.name, *("" if getattr(run, c) is None else repr(getattr(run, c)) for c in numbers)])


def predict_holdout(plan: SweepPlan, runs: list) -> dict[str, Any]:
    """Fits all budgets but the largest of `runs` (the sweep's RunRecords), predicts the largest's optimal
    loss, compares with its best run.

    The law's compute-optimal allocation assumes C = 6ND; the held-out budget is converted to that
    convention with the FLOPs per parameter-token k of its best run (C_6ND = 6 C / k), so the
    predicted (N, D) spends the budget in the runs' own FLOP count.
    """
    from lmjax.scaling.fit import ScalingLaw, predict
    from lmjax.scaling.report import run_fit
    from lmjax.scaling.runs import FitInputError

    sweep = plan.sweep
    largest = max(sweep.budgets)
    held = [r for r in runs if r.budget is not None and math.isclose(r.budget, largest, rel_tol=1e-9)]
    if not held:
        raise FitInputError(f"prediction: no completed run at the held-out budget C={format_number(largest)}")
    holdout_dir = plan.sweep_dir / "holdout"
    _write_runs_csv(holdout_dir / "runs.csv", [r for r in runs if r not in held])
    fit = run_fit(holdout_dir / "runs.csv", out_dir=holdout_dir, param_convention=sweep.param_convention,
                  seed=sweep.fit.seed, bootstrap=sweep.fit.bootstrap)
    best = min(held, key=lambda r: r.loss)
    flops_per_param_token = best.flops / (best.params * best.tokens) if best.flops else 6.0
    predicted = predict(fit, largest * 6.0 / flops_per_param_token)
    law = ScalingLaw(**{k: fit["approach3"][k]["value"] for k in ("E", "A", "B", "alpha", "beta")})
    prediction = {
        "C": largest,
        "C_6ND": largest * 6.0 / flops_per_param_token,
        "predicted_loss": predicted["loss"],
        "predicted_N": predicted["N_opt"],
        "predicted_D": predicted["D_opt"],
        "measured_loss": best.loss,
        "measured_run": best.name,
        "measured_N": best.params,
        "measured_D": best.tokens,
        "relative_error": (predicted["loss"] - best.loss) / best.loss,
        "predicted_loss_at_measured_run": float(law.loss(best.params, best.tokens)),
        "param_convention": sweep.param_convention,
        "fit": str(holdout_dir / "fit.json"),
    }
    write_json_atomic(plan.sweep_dir / "prediction.json", prediction, indent=1)
    return prediction


def print_prediction(p: dict[str, Any], sweep_dir: Path) -> None:
    print(f"prediction at the held-out C={format_number(p['C'])} (fit on the smaller budgets): "
          f"loss {p['predicted_loss']:.4f} at N={format_number(p['predicted_N'])}; measured {p['measured_loss']:.4f} "
          f"({p['measured_run']}); relative error {p['relative_error']:+.2%} -> {sweep_dir / 'prediction.json'}")


# ----------------------------------------------------------------------------- the command


def sweep_command(sweep_path: str, overrides: list[str], plan_only: bool, executor: Executor | None = None) -> int:
    """`lmjax sweep SWEEP.yaml [overrides] [--plan-only]`: 0 when every run finished and the fit was made."""
    from lmjax.scaling.report import run_fit
    from lmjax.scaling.runs import FitInputError, load_run_table

    sweep, base_dir = load_sweep(sweep_path, overrides)
    plan = plan_sweep(sweep, base_dir)
    print(format_table(plan), flush=True)
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if plan_only:
        difference = plan_difference(plan)
        if difference:
            print(f"note: {plan.sweep_dir / 'plan.json'} holds a different plan ({difference}); "
                  "running would be refused")
        return 0
    write_plan(plan)
    try:
        failures = run_sweep(plan, executor or LocalExecutor())
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    for name, reason in failures.items():
        print(f"failed: {name}: {reason}", file=sys.stderr)
    try:
        table = load_run_table(plan.sweep_dir, sweep.param_convention)
        fit = run_fit(plan.sweep_dir, param_convention=sweep.param_convention, seed=sweep.fit.seed,
                      bootstrap=sweep.fit.bootstrap, table=table)
        # The fitted runs as a table: `lmjax fit sweep_dir/runs.csv` refits without the run folders.
        _write_runs_csv(plan.sweep_dir / "runs.csv", table.runs)
        print_fit(fit, plan.sweep_dir)
        if sweep.predict.holdout_largest:
            print_prediction(predict_holdout(plan, table.runs), plan.sweep_dir)
    except FitInputError as err:
        print(f"fit: {err}", file=sys.stderr)
        return 1
    if failures:
        print(f"{len(failures)} of {len(plan.runs)} runs failed; fix and rerun the same command", file=sys.stderr)
        return 1
    return 0
