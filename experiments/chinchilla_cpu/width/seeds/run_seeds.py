"""Seeds 1 and 2 of the fourth design's runs above its learning-rate grid (4e12-3.2e13), then the
fit and the held-out prediction with each setting at its three seeds' aggregate.

    .venv/bin/python experiments/chinchilla_cpu/width/seeds/run_seeds.py [--parallel 2] [--budgets 3.2e13 ...]
        [--seed-aggregate mean|median] [--seeds 1 2] [--study experiments/chinchilla_cpu/short]

`--study` names another study's folder (its committed plan.json and runs.csv): its seeds then go to
runs/<its sweep_dir's name>_seeds and its table, fit and plots to <study>/seeds. What follows is said
of the default study, the fourth design (`width/`).

Each run is the committed plan's (`width/plan.json`: its base config plus the run's overrides, so
the same shape, steps, learning rate and schedule) with `seed=1` or `seed=2`, trained by `lmjax
train` into runs/chinchilla_cpu_width_seeds/runs/<name>_s<seed>. The table is this folder's
runs.csv (the committed `width/runs.csv`, seed 0, plus the seed runs already recorded here: those
are not trained again, so a rerun resumes) plus the new runs, with the budget and learning rate of
their plan entry. Runs differing only by seed are one point of the fit, at their seeds' aggregate
(`lmjax.scaling.runs.average_seeds`). The smallest budget is the learning-rate grid (six rates per
size): seeds there are left out, since an averaged setting would compete with single-seed ones for
the best rate. Writes runs.csv, fit.json, report.md and the plots in this folder, and
prediction.json and holdout/ in runs/chinchilla_cpu_width_seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import queue
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from lmjax.config import Config, save_config
from lmjax.config_tree import build
from lmjax.fileio import read_completed_summary
from lmjax.scaling.executors import DeviceShare, split_devices
from lmjax.scaling.report import run_fit
from lmjax.scaling.runs import SEED_AGGREGATES, load_run_table
from lmjax.scaling.sweep import _write_runs_csv, predict_holdout, print_prediction

HERE = Path("experiments/chinchilla_cpu/width/seeds")  # run from the repository root, as the docstring does
WIDTH = HERE.parent
SWEEP_DIR = Path("runs/chinchilla_cpu_width_seeds")
SEEDS = (1, 2)


def plan_entry(name: str) -> tuple[dict, dict]:
    """width/plan.json and its run `name` (a one-line exit for a name it does not have)."""
    plan = json.loads((WIDTH / "plan.json").read_text())
    entry = next((e for e in plan["runs"] if e["name"] == name), None)
    if entry is None:
        sys.exit(f"--run {name}: no such run in {WIDTH / 'plan.json'}")
    return plan, entry


def write_base_config(plan: dict, sweep_dir: Path = SWEEP_DIR) -> Path:
    """The plan's base config as a file `lmjax train` reads (each run adds its entry's overrides)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    base = sweep_dir / "base.yaml"
    save_config(build(Config, plan["base_config"]), base)
    return base


def train(base: Path, entry: dict, run_dir: Path, changes: list[str], share: DeviceShare | None) -> Path:
    """The plan entry's run with `changes` (overrides applied after the entry's, so they win) into
    `run_dir`, unless it completed there; its log beside it. Pinned to `share`'s cores as `lmjax sweep
    --parallel` pins its runs (XLA sizes its thread pools from the affinity mask: unpinned, two runs
    would each start a pool per core)."""
    if read_completed_summary(run_dir) is None:
        overrides = [o for o in entry["overrides"] if not o.startswith("run_dir=")]
        pinning = {} if share is None else {"env": share.environment(dict(os.environ)),
                                            "preexec_fn": partial(os.sched_setaffinity, 0, share.cpus)}
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        with (run_dir.parent / f"{run_dir.name}.log").open("a") as log:
            subprocess.run([sys.executable, "-m", "lmjax.cli", "train", str(base), *overrides, f"run_dir={run_dir}",
                            *changes, "logging.progress=false"], stdout=log, stderr=subprocess.STDOUT, check=True,
                           **pinning)
    return run_dir


def core_shares(parallel: int) -> "queue.Queue[DeviceShare | None]":
    """`parallel` disjoint shares of this process's cores (one unpinned slot for 1), to take and give back."""
    shares = queue.Queue()
    for share in split_devices(parallel, sorted(os.sched_getaffinity(0)), []) if parallel > 1 else [None]:
        shares.put(share)
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parallel", type=int, default=1, help="runs at once")
    parser.add_argument("--budgets", type=float, nargs="+", default=None,
                        help="budgets to seed (default: every budget above the smallest, the learning-rate grid)")
    parser.add_argument("--seed-aggregate", choices=SEED_AGGREGATES, default="mean",
                        help="how a setting's seeds become one point of the fit")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="seeds to train beside seed 0")
    parser.add_argument("--study", type=Path, default=WIDTH,
                        help="the study's folder: its plan.json and runs.csv (default: the fourth design's)")
    args = parser.parse_args()
    study = args.study
    if not (study / "plan.json").is_file() or not (study / "runs.csv").is_file():
        sys.exit(f"--study {study}: expected a study folder with plan.json and runs.csv")
    if any(seed <= 0 for seed in args.seeds) or len(set(args.seeds)) != len(args.seeds):
        sys.exit(f"--seeds: expected distinct integers > 0 (seed 0 is the study's own run), got {args.seeds}")
    out = study / "seeds"  # HERE for the default study
    plan = json.loads((study / "plan.json").read_text())
    sweep_dir = Path(f"{plan['sweep_dir'].rstrip('/')}_seeds")
    budgets = args.budgets or sorted(plan["budgets"])[1:]
    if unknown := sorted(set(budgets) - set(plan["budgets"])):
        sys.exit(f"--budgets: {unknown} are not budgets of {study / 'plan.json'} (expected some of {plan['budgets']})")
    out.mkdir(parents=True, exist_ok=True)
    table_csv = out / "runs.csv" if (out / "runs.csv").is_file() else study / "runs.csv"
    recorded = load_run_table(table_csv, plan["param_convention"]).completed
    done = {r.name for r in recorded}
    # Largest budgets first: the seeds nearest the held-out budget matter most to its prediction, and
    # long runs first pack the parallel slots best; an interrupted study has its top budgets complete.
    jobs = [(entry, seed) for entry in sorted(plan["runs"], key=lambda e: -e["budget"]) for seed in args.seeds
            if entry["budget"] in budgets and f"{entry['name']}_s{seed}" not in done]
    print(f"{len(jobs)} runs to train ({len(done)} recorded in {table_csv})")

    base = write_base_config(plan, sweep_dir)
    extra = []
    lock = threading.Lock()
    shares = core_shares(args.parallel)

    def train_and_record(job):
        entry, seed = job
        share = shares.get()
        try:
            run_dir = train(base, entry, sweep_dir / "runs" / f"{entry['name']}_s{seed}", [f"seed={seed}"], share)
        finally:
            shares.put(share)
        record = load_run_table(run_dir, plan["param_convention"]).completed[0]
        assert (record.params, record.tokens) == (entry["params"], entry["tokens"]), run_dir
        record = dataclasses.replace(record, name=run_dir.name, budget=entry["budget"], lr=entry["lr"], seed=seed)
        with lock:  # each finished run is written at once, so an interrupted study keeps what it trained
            extra.append(record)
            _write_runs_csv(out / "runs.csv", recorded + sorted(extra, key=lambda r: r.name))
            print(f"{run_dir.name}: {record.loss:.4f}", flush=True)

    with ThreadPoolExecutor(args.parallel) as pool:
        list(pool.map(train_and_record, jobs))

    table = load_run_table(out / "runs.csv", plan["param_convention"], seed_aggregate=args.seed_aggregate)
    fit = run_fit(out / "runs.csv", out_dir=out, param_convention=plan["param_convention"], table=table)
    print(f"seeds aggregated by their {args.seed_aggregate}; Approach 3 a = {fit['approach3']['a']}")
    print_prediction(predict_holdout(table, sweep_dir, max(plan["budgets"]), plan["param_convention"]), sweep_dir)


if __name__ == "__main__":
    main()
