"""Submit lmjax to SLURM with this interpreter; --dry-run prints the sbatch command instead.

  python launch/slurm.py train --nodes 2 --gpus-per-node 8 CONFIG [overrides] [--dry-run]
      one run over 2 nodes (launch/slurm_train.sbatch: srun, one task per node; --task-per-gpu:
      one per GPU)
  python launch/slurm.py sweep SWEEP.yaml [overrides] [--parallel N] [--slurm-cpus N ...] [--dry-run]
      writes the sweep's plan and run configs and submits the runs still to do as one job array
      (launch/slurm_sweep.sbatch), without waiting; `lmjax fit SWEEP_DIR` when it is done.
      `lmjax sweep SWEEP.yaml --executor slurm` submits the same array, waits and fits.

The jobs run `python -m lmjax.cli` with the interpreter that runs this script (LMJAX_PYTHON in the
job's environment), so use the one lmjax is installed in, on a path the compute nodes share.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from lmjax.cli import parse_with_overrides
from lmjax.errors import UserError
from lmjax.fileio import read_completed_summary
from lmjax.scaling.executors import SlurmExecutor, SlurmResources, add_slurm_arguments, slurm_resources

TRAIN_SCRIPT = Path(__file__).resolve().parent / "slurm_train.sbatch"


def train_command(args: argparse.Namespace) -> list[str]:
    if args.nodes < 1 or args.gpus_per_node < 0:
        raise UserError(f"--nodes must be >= 1 and --gpus-per-node >= 0; got {args.nodes} and {args.gpus_per_node}")
    if args.task_per_gpu and not args.gpus_per_node:
        raise UserError("--task-per-gpu needs --gpus-per-node G (G tasks per node, one GPU each)")
    command = ["sbatch", f"--nodes={args.nodes}"]
    if args.task_per_gpu:
        command += [f"--ntasks-per-node={args.gpus_per_node}", "--gpus-per-task=1"]
    elif args.gpus_per_node:
        command += [f"--gres=gpu:{args.gpus_per_node}"]
    command += [f"--cpus-per-task={args.cpus_per_task}"] if args.cpus_per_task else []
    command += [f"--partition={args.partition}"] if args.partition else []
    command += [f"--time={args.time}"] if args.time else []
    return command + [f"--export=ALL,LMJAX_PYTHON={os.path.abspath(sys.executable)}", str(TRAIN_SCRIPT),
                      args.config, *args.overrides]


def submit_train(args: argparse.Namespace) -> int:
    command = train_command(args)
    if args.dry_run:
        print(shlex.join(command))
        # What each task of the job then runs (the batch script's own dry run).
        env = {**os.environ, "LMJAX_PYTHON": os.path.abspath(sys.executable)}
        srun = subprocess.run(["bash", str(TRAIN_SCRIPT), "--dry-run", args.config, *args.overrides],
                              env=env, capture_output=True, text=True, check=True).stdout.strip()
        print(f"# then, in the job: {srun}")
        return 0
    if shutil.which("sbatch") is None:
        raise UserError("sbatch is not on PATH: run this on a SLURM login node")
    return subprocess.run(command).returncode


def submit_sweep(args: argparse.Namespace) -> int:
    from lmjax.scaling.plan import format_table, load_sweep, plan_sweep
    from lmjax.scaling.sweep import SweepError, choose_learning_rates, pending_runs, plan_difference, write_plan

    executor = SlurmExecutor(slurm_resources(args) or SlurmResources(), parallel=args.parallel,
                             require_slurm=not args.dry_run)
    sweep, base_dir = load_sweep(args.sweep, args.overrides)
    plan = choose_learning_rates(plan_sweep(sweep, base_dir), base_dir)
    print(format_table(plan), flush=True)
    if args.dry_run:
        difference = plan_difference(plan)
        if difference:
            raise SweepError(f"{plan.sweep_dir / 'plan.json'} holds a different plan ({difference})")
        runs = [run for run in plan.runs if not run.pending and read_completed_summary(run.run_dir) is None]
    else:
        write_plan(plan)
        runs, failures = pending_runs(plan)
        for name, reason in failures.items():
            print(f"not submitted: {name}: {reason}", file=sys.stderr)
    if not runs:
        print(f"nothing to submit: every run of {plan.sweep_dir} is finished or cannot run; lmjax fit {plan.sweep_dir}")
        return 0
    if args.dry_run:
        runs_file, text, command = executor.prepare(runs)
        print(f"# would write {runs_file} ({len(runs)} runs, array task i = line i):")
        print("".join(f"#   {line}\n" for line in text.splitlines()), end="")
        print(shlex.join(command))
        return 0
    job = executor.submit(runs)
    if plan.pending:  # lr_rule grid or mup: the rest needs the tuning runs' learning rates
        print(f"{len(plan.pending)} runs wait for the learning rates of the runs submitted now: rerun this "
              f"command when job {job} is done to submit them")
    print(f"when job {job} is done (squeue --jobs={job} lists nothing): lmjax fit {plan.sweep_dir}; "
          "rerunning this submits the unfinished runs again")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launch/slurm.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="one run over several nodes (srun, one task per node or per GPU)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (default 0: none asked for)")
    p.add_argument("--task-per-gpu", action="store_true", help="one task (process) per GPU instead of one per node")
    p.add_argument("--cpus-per-task", type=int, default=None)
    p.add_argument("--partition", default=None)
    p.add_argument("--time", default=None, help="time limit, e.g. 24:00:00")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch command instead of running it")
    p.set_defaults(func=submit_train)
    p = sub.add_parser("sweep", help="a sweep's unfinished runs as one job array, without waiting")
    p.add_argument("sweep", help="sweep YAML (configs/sweeps/)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides of the sweep config")
    p.add_argument("--parallel", type=int, default=None, metavar="N", help="at most N array tasks at once")
    add_slurm_arguments(p)
    p.add_argument("--dry-run", action="store_true", help="print the sbatch command; write nothing")
    p.set_defaults(func=submit_sweep)
    args = parse_with_overrides(parser, argv)
    try:
        return args.func(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
