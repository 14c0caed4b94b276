"""`lmjax sweep SWEEP.yaml`: write the plan, run every run, fit, and optionally check a prediction.

sweep_dir/plan.json      the plan (`plan.py`); a rerun must plan exactly the same runs (runs
                         pending on the tuning runs' learning rates get them filled in, `lr_rules.py`)
sweep_dir/runs/<name>/   ordinary `lmjax train` run directories (+ train.log with their output)
sweep_dir/fit.json, report.md, *.png          the fit of every finished run (`report.run_fit`)
sweep_dir/holdout/, sweep_dir/prediction.json with predict.holdout_largest=true
sweep_dir/slurm/         with --executor slurm: the job arrays' lists of runs and SLURM's logs

Rerunning the command skips finished runs (summary.json with status "completed") and hands the
rest to the executor; `lmjax train` resumes an interrupted run from its last checkpoint by itself.
Executors (`executors.py`: local, N runs at once; SLURM job arrays; in-process) only run runs:
planning, bookkeeping and fitting stay here.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

from lmjax.config import ConfigError, load_config, save_config, to_dict
from lmjax.errors import UserError
from lmjax.fileio import read_completed_summary, write_json_atomic
from lmjax.scaling.executors import Executor, InProcessExecutor, LocalExecutor  # noqa: F401 (re-exported)
from lmjax import flops
from lmjax.scaling import lr_rules
from lmjax.scaling.plan import PlannedRun, SweepPlan, format_number, format_table, load_sweep, plan_sweep


class SweepError(UserError):
    """A sweep directory that cannot be used as asked."""


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
    existing = {k: v for k, v in existing.items() if k not in after_runs}
    # Runs pending on the tuning runs' choice may since have got their learning rate.
    chosen = {run["name"]: run for run in planned.get("runs", []) if run.get("lr_source") != "pending"}
    if isinstance(existing.get("runs"), list):
        existing["runs"] = [chosen.get(run.get("name"), run) if isinstance(run, dict) and run.get("lr_source") == "pending"
                            else run for run in existing["runs"]]
        if existing.get("lr_choice") is None and "lr_choice" in existing:
            existing["lr_choice"] = planned.get("lr_choice")
    return first_difference(existing, planned)


def write_plan(plan: SweepPlan) -> Path:
    """Writes plan.json, or checks that the one there is the same plan (never overwrites another)."""
    path = plan.sweep_dir / "plan.json"
    difference = plan_difference(plan)
    if difference:
        raise SweepError(f"{path} holds a different plan ({difference}); use another sweep_dir, "
                         "or the sweep config and overrides that made it")
    if not path.exists() or json.loads(path.read_text()) != json.loads(json.dumps(plan.to_json())):
        path.parent.mkdir(parents=True, exist_ok=True)  # new, or its pending runs now have learning rates
        write_json_atomic(path, plan.to_json(), indent=1)
    return path


def choose_learning_rates(plan: SweepPlan, base_dir: Path) -> SweepPlan:
    """The plan with its pending runs' learning rates, once every tuning run finished; else unchanged."""
    if not plan.pending:
        return plan
    losses: dict[tuple[int, int], dict[float, list[float]]] = {}
    tuning = [run for run in plan.runs if run.lr_source == "grid"]
    for run in tuning:
        summary = read_completed_summary(run.run_dir)
        if summary is None:
            return plan
        size = (flops.param_counts(run.config.model)["total"], run.config.model.d_model)
        losses.setdefault(size, {}).setdefault(run.lr, []).append(float(summary["final_eval_loss"]))
    choice = lr_rules.choose(plan.sweep.lr_rule, min(run.budget for run in tuning), losses, plan.sweep.lr_fit)
    return plan_sweep(plan.sweep, base_dir, choice)


def print_choice(choice: lr_rules.LRChoice) -> None:
    print(f"learning rates chosen at C={format_number(choice.budget)} (lr_rule {choice.rule}):")
    for size in choice.sizes:
        losses = ", ".join(f"{format_number(lr)}: {loss:.4f}" for lr, loss in sorted(size.loss_by_lr.items()))
        print(f"  N={size.params_total:,} (d_model {size.d_model}): lr {format_number(size.best_lr)} ({losses})")
    if choice.fit == "power_law":
        coefficient, exponent = choice.power_law()
        print(f"  every run: lr = {format_number(coefficient)} x N^{exponent:.3f}, fitted through the parabola vertices "
              + ", ".join(format_number(size.smoothed_lr) for size in choice.sizes))


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


def pending_runs(plan: SweepPlan) -> tuple[list[PlannedRun], dict[str, str]]:
    """(the runs still to do, with their config.yaml written; {run name: why it cannot run})."""
    pending, failures = [], {}
    for run in plan.runs:
        if run.pending or read_completed_summary(run.run_dir) is not None:
            continue
        try:
            write_run_config(run)
        except ConfigError as err:
            failures[run.name] = str(err)
            continue
        pending.append(run)
    finished = len(plan.runs) - len(pending) - len(failures) - len(plan.pending)
    if finished:
        print(f"{finished} of {len(plan.runs)} runs already finished: skipped")
    return pending, failures


def run_sweep(plan: SweepPlan, executor: Executor) -> dict[str, str]:
    """Runs every unfinished run; returns {run name: why it failed} (the files decide what finished)."""
    pending, failures = pending_runs(plan)
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
    numbers = ("params", "tokens", "loss", "flops", "budget", "lr", "loss_stderr", "seed")
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("name", *numbers))
        for run in runs:  # repr: floats read back exactly; empty: an optional value the run lacks
            writer.writerow([run.name, *("" if getattr(run, c) is None else repr(getattr(run, c)) for c in numbers)])


def predict_holdout(table, out_dir: Path, largest: float, param_convention: str = "total", seed: int = 0,
                    bootstrap: int = 200) -> dict[str, Any]:
    """Fits all budgets of `table` (a RunTable) but the largest one, `largest`, predicts its optimal
    loss, compares with its best run (seeds averaged). Writes out_dir/holdout/ (the fit) and
    out_dir/prediction.json.

    Two predictions: Approach 3's law at its compute-optimal (N, D) (`predicted_loss`), and the
    IsoFLOP minima law (`minima_law_loss`, with its bootstrap interval). Approach 3's allocation
    assumes C = 6ND; the held-out budget is converted to that convention with the FLOPs per
    parameter-token k of its best run (C_6ND = 6 C / k), so the predicted (N, D) spends the budget
    in the runs' own FLOP count. The minima law reads the budget as counted.
    """
    from lmjax.scaling.fit import ScalingLaw, predict
    from lmjax.scaling.report import fit_and_report
    from lmjax.scaling.runs import FitInputError, load_run_table

    def is_held(run) -> bool:
        return run.budget is not None and math.isclose(run.budget, largest, rel_tol=1e-9)

    held = [r for r in table.runs if is_held(r)]
    if not held:
        raise FitInputError(f"prediction: no completed run at the held-out budget C={format_number(largest)}")
    holdout_dir = Path(out_dir) / "holdout"
    _write_runs_csv(holdout_dir / "runs.csv", [r for r in table.completed if not is_held(r)])
    holdout = load_run_table(holdout_dir / "runs.csv", param_convention, table.seed_aggregate)
    result, fit = fit_and_report(holdout_dir / "runs.csv", out_dir=holdout_dir, param_convention=param_convention,
                                 seed=seed, bootstrap=bootstrap, table=holdout)
    best = min(held, key=lambda r: r.loss)
    flops_per_param_token = best.flops / (best.params * best.tokens) if best.flops else 6.0
    predicted = predict(fit, largest * 6.0 / flops_per_param_token)
    law = ScalingLaw.from_fit(fit)
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
        **_minima_law_prediction(result.minima_loss(largest), best.loss),
        "param_convention": param_convention,
        **({"seed_aggregate": table.seed_aggregate} if any(r.seed_losses for r in held) else {}),
        "fit": str(holdout_dir / "fit.json"),
    }
    write_json_atomic(Path(out_dir) / "prediction.json", prediction, indent=1)
    return prediction


def _minima_law_prediction(estimate: dict | None, measured: float) -> dict[str, Any]:
    """prediction.json's keys for the IsoFLOP minima law (null without an Approach 2 fit)."""
    value = None if estimate is None else estimate["value"]
    return {"minima_law_loss": value,
            "minima_law_ci_low": None if estimate is None else estimate["ci_low"],
            "minima_law_ci_high": None if estimate is None else estimate["ci_high"],
            "minima_law_relative_error": None if value is None else (value - measured) / measured}


def print_prediction(p: dict[str, Any], sweep_dir: Path) -> None:
    print(f"prediction at the held-out C={format_number(p['C'])} (fit on the smaller budgets): "
          f"loss {p['predicted_loss']:.4f} at N={format_number(p['predicted_N'])}; measured {p['measured_loss']:.4f} "
          f"({p['measured_run']}); relative error {p['relative_error']:+.2%} -> {sweep_dir / 'prediction.json'}")
    if p["minima_law_loss"] is not None:
        interval = (f" [{p['minima_law_ci_low']:.4f}, {p['minima_law_ci_high']:.4f}]"
                    if p["minima_law_ci_low"] is not None else "")
        print(f"  IsoFLOP minima law: loss {p['minima_law_loss']:.4f}{interval}; "
              f"relative error {p['minima_law_relative_error']:+.2%}")


# ----------------------------------------------------------------------------- the command


def sweep_command(sweep_path: str, overrides: list[str], plan_only: bool, executor: Executor | None = None) -> int:
    """`lmjax sweep SWEEP.yaml [overrides] [--plan-only]`: 0 when every run finished and the fit was made."""
    from lmjax.scaling.report import run_fit
    from lmjax.scaling.runs import FitInputError, load_run_table

    sweep, base_dir = load_sweep(sweep_path, overrides)
    plan = choose_learning_rates(plan_sweep(sweep, base_dir), base_dir)
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
    executor = executor or LocalExecutor()
    try:
        failures = run_sweep(plan, executor)
        if plan.pending:  # the tuning runs ran: choose, then run the rest
            plan = choose_learning_rates(plan, base_dir)
            if plan.pending:
                failures.update({run.name: "not run: a tuning run did not finish" for run in plan.pending})
            else:
                print_choice(plan.lr_choice)
                for warning in plan.lr_choice.warnings():
                    print(f"warning: {warning}", file=sys.stderr)
                write_plan(plan)
                failures.update(run_sweep(plan, executor))
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    for name, reason in failures.items():
        print(f"failed: {name}: {reason}", file=sys.stderr)
    try:
        table = load_run_table(plan.sweep_dir, sweep.param_convention, sweep.fit.seed_aggregate)
        fit = run_fit(plan.sweep_dir, param_convention=sweep.param_convention, seed=sweep.fit.seed,
                      bootstrap=sweep.fit.bootstrap, table=table)
        # The fitted runs as a table: `lmjax fit sweep_dir/runs.csv` refits without the run folders.
        _write_runs_csv(plan.sweep_dir / "runs.csv", table.completed)
        print_fit(fit, plan.sweep_dir)
        if sweep.predict.holdout_largest:
            print_prediction(predict_holdout(table, plan.sweep_dir, max(sweep.budgets), sweep.param_convention,
                                             sweep.fit.seed, sweep.fit.bootstrap), plan.sweep_dir)
    except FitInputError as err:
        print(f"fit: {err}", file=sys.stderr)
        return 1
    if failures:
        print(f"{len(failures)} of {len(plan.runs)} runs failed; fix and rerun the same command", file=sys.stderr)
        return 1
    return 0
