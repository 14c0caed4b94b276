"""Copy finished runs of an earlier sweep into a new one where the two plan the very same run.

    python experiments/chinchilla_cpu/reuse_runs.py configs/sweeps/chinchilla_cpu.yaml runs/chinchilla_cpu_v2

A run is copied only when the earlier run completed and its config.yaml equals the new plan's
config in every key but `run_dir` (same shape, steps, learning rate, schedule, seed, data): training
is deterministic on one CPU process, so rerunning it would repeat the same computation. Runs whose
learning rate still waits on the tuning runs are left alone; run this again once the sweep has
chosen them. The copy's config.yaml is the new plan's, and REUSED_FROM names the original.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from lmjax.config import load_config, save_config, to_dict
from lmjax.fileio import read_completed_summary
from lmjax.scaling.plan import load_sweep, plan_sweep
from lmjax.scaling.sweep import choose_learning_rates


def reusable(run, earlier_runs: Path) -> Path | None:
    source = earlier_runs / run.name
    if run.pending or read_completed_summary(source) is None or read_completed_summary(run.run_dir) is not None:
        return None
    earlier, planned = to_dict(load_config(source / "config.yaml")), to_dict(run.config)
    earlier.pop("run_dir"), planned.pop("run_dir")
    return source if earlier == planned else None


def main(sweep_path: str, earlier_sweep_dir: str) -> None:
    sweep, base_dir = load_sweep(sweep_path)
    plan = choose_learning_rates(plan_sweep(sweep, base_dir), base_dir)
    copied = 0
    for run in plan.runs:
        source = reusable(run, Path(earlier_sweep_dir) / "runs")
        if source is None:
            continue
        if run.run_dir.exists():
            shutil.rmtree(run.run_dir)  # an unfinished attempt of the same run
        shutil.copytree(source, run.run_dir, ignore=shutil.ignore_patterns("checkpoints", "wandb"))
        save_config(run.config, run.run_dir / "config.yaml")
        (run.run_dir / "REUSED_FROM").write_text(f"{source}\n")
        copied += 1
        print(f"reused {run.name} from {source}")
    print(f"{copied} runs reused; {sum(run.pending for run in plan.runs)} still wait on the tuning runs")


if __name__ == "__main__":
    main(*sys.argv[1:])
