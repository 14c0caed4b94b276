"""Seeds 1 and 2 of the fourth design's five runs at its held-out budget (3.2e13), then the fit and
the held-out prediction with each of those sizes at its three seeds' mean.

    .venv/bin/python experiments/chinchilla_cpu/width/seeds/run_seeds.py [--parallel 2]

Each run is the committed plan's (`width/plan.json`: its base config plus the run's overrides, so
the same shape, steps, learning rate and schedule) with `seed=1` or `seed=2`, trained by `lmjax
train` into runs/chinchilla_cpu_width_seeds/runs/<name>_s<seed>; finished runs are skipped, so a
rerun resumes. The table is the committed `width/runs.csv` (seed 0) plus these ten runs, with the
budget and learning rate of their plan entry: runs differing only by seed are one point of the
fit, at their mean (`lmjax.scaling.runs.average_seeds`). Writes runs.csv, fit.json, report.md and
the plots in this folder, and prediction.json and holdout/ in runs/chinchilla_cpu_width_seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lmjax.config import Config, save_config
from lmjax.config_tree import build
from lmjax.fileio import read_completed_summary
from lmjax.scaling.report import run_fit
from lmjax.scaling.runs import load_run_table
from lmjax.scaling.sweep import _write_runs_csv, predict_holdout, print_prediction

HERE = Path("experiments/chinchilla_cpu/width/seeds")  # run from the repository root, as the docstring does
WIDTH = HERE.parent
SWEEP_DIR = Path("runs/chinchilla_cpu_width_seeds")
SEEDS = (1, 2)


def train(base: Path, entry: dict, seed: int) -> Path:
    run_dir = SWEEP_DIR / "runs" / f"{entry['name']}_s{seed}"
    if read_completed_summary(run_dir) is None:
        overrides = [o for o in entry["overrides"] if not o.startswith("run_dir=")]
        with (SWEEP_DIR / f"{run_dir.name}.log").open("w") as log:
            subprocess.run([sys.executable, "-m", "lmjax.cli", "train", str(base), *overrides, f"run_dir={run_dir}",
                            f"seed={seed}", "logging.progress=false"], stdout=log, stderr=subprocess.STDOUT, check=True)
    return run_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parallel", type=int, default=1, help="runs at once")
    args = parser.parse_args()
    plan = json.loads((WIDTH / "plan.json").read_text())
    held = [entry for entry in plan["runs"] if entry["budget"] == max(plan["budgets"])]
    SWEEP_DIR.mkdir(parents=True, exist_ok=True)
    base = SWEEP_DIR / "base.yaml"
    save_config(build(Config, plan["base_config"]), base)
    jobs = [(entry, seed) for seed in SEEDS for entry in held]
    with ThreadPoolExecutor(args.parallel) as pool:
        run_dirs = list(pool.map(lambda job: train(base, *job), jobs))

    extra = []
    for (entry, seed), run_dir in zip(jobs, run_dirs):
        record = load_run_table(run_dir, plan["param_convention"]).completed[0]
        assert (record.params, record.tokens) == (entry["params"], entry["tokens"]), run_dir
        extra.append(dataclasses.replace(record, name=run_dir.name, budget=entry["budget"], lr=entry["lr"], seed=seed))
    committed = load_run_table(WIDTH / "runs.csv", plan["param_convention"]).completed
    _write_runs_csv(HERE / "runs.csv", committed + extra)
    for entry, seed, record in ((e, s, r) for (e, s), r in zip(jobs, extra)):
        print(f"{entry['name']} seed {seed}: {record.loss:.4f}")

    table = load_run_table(HERE / "runs.csv", plan["param_convention"])
    fit = run_fit(HERE / "runs.csv", out_dir=HERE, param_convention=plan["param_convention"], table=table)
    print(f"Approach 3 a = {fit['approach3']['a']}")
    print_prediction(predict_holdout(table, SWEEP_DIR, max(plan["budgets"]), plan["param_convention"]), SWEEP_DIR)


if __name__ == "__main__":
    main()
