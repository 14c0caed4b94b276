"""How `lmjax sweep` runs a sweep's runs: `--executor local|slurm [--parallel N]`.

An executor gets runs whose RUN_DIR/config.yaml is already written and runs each to its end. It
never plans, skips or fits (`sweep.py` does), and the run directories, not exit codes, tell the
sweep which runs finished (summary.json with status "completed"), so a rerun resumes whatever an
executor left unfinished.

LocalExecutor      this machine, N runs at a time, each its own `python -m lmjax.cli train` process
                   pinned to its own share of the GPUs and CPU cores
InProcessExecutor  this process, one run after another (no start-up cost per run; tests use it)
SlurmExecutor      one SLURM job array of launch/slurm_sweep.sbatch, one array task per run, waited
                   for by polling squeue (no accounting database needed)
"""

from __future__ import annotations

import abc
import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from lmjax.errors import UserError
from lmjax.fileio import read_completed_summary, write_text_atomic

if TYPE_CHECKING:
    from lmjax.scaling.plan import PlannedRun

EXECUTORS = ("local", "slurm")
CHILD_SHUTDOWN_SECONDS = 120  # after Ctrl-C, time a training subprocess gets to save its checkpoint
POLL_SECONDS = 0.25  # local: how often finished subprocesses are looked for
SWEEP_SCRIPT = Path(__file__).resolve().parents[2] / "launch" / "slurm_sweep.sbatch"


class ExecutorError(UserError):
    """An executor that cannot run as asked (its arguments, or what it needs on this machine)."""


class Executor(abc.ABC):
    """Runs planned runs whose config.yaml is already in their run directory."""

    @abc.abstractmethod
    def execute(self, runs: Sequence[PlannedRun]) -> dict[str, str]:
        """Runs every run to its end; returns {run name: why it failed} for the runs that failed.

        A failed run must not stop the others. Ctrl-C (KeyboardInterrupt) stops the sweep.
        """


def _announce(i: int, n: int, run: PlannedRun, where: str = "") -> float:
    print(f"[{i}/{n}] {run.name}: {run.steps} steps, {run.tokens:,} tokens{where} ({run.run_dir}/train.log)", flush=True)
    return time.perf_counter()


def _report_done(run: PlannedRun, start: float) -> None:
    summary = read_completed_summary(run.run_dir)
    loss = f", eval loss {summary['final_eval_loss']:.4f}" if summary else ""
    print(f"      {run.name} done in {time.perf_counter() - start:.0f}s{loss}", flush=True)


def _last_line(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no output"
    return lines[-1][:300] if lines else "no output"


def _check_parallel(parallel: int | None) -> None:
    if parallel is not None and (isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1):
        raise ExecutorError(f"--parallel must be a whole number >= 1 (runs at once); got {parallel!r}")


# ----------------------------------------------------------------------------- this machine


def visible_gpus() -> list[str]:
    """The CUDA GPUs runs may use: CUDA_VISIBLE_DEVICES when set, else what nvidia-smi lists;
    none when JAX_PLATFORMS leaves CUDA out."""
    platforms = os.environ.get("JAX_PLATFORMS", "").lower()
    if platforms and "cuda" not in platforms and "gpu" not in platforms:
        return []
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [g.strip() for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip() not in ("", "-1")]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listed = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in listed.stdout.splitlines() if line.strip()] if listed.returncode == 0 else []


def _ranges(numbers: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5' (taskset's notation)."""
    parts, start = [], None
    for i, n in enumerate(numbers):
        start = n if start is None else start
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            parts.append(f"{start}-{n}" if n != start else str(n))
            start = None
    return ",".join(parts)


@dataclass(frozen=True)
class DeviceShare:
    """What one of N simultaneous runs may use: CPU cores, and GPUs (None: no GPU in use)."""

    cpus: tuple[int, ...]
    gpus: tuple[str, ...] | None

    def describe(self) -> str:
        gpus = "" if self.gpus is None else f", CUDA_VISIBLE_DEVICES={','.join(self.gpus)}"
        return f"CPUs {_ranges(self.cpus)}{gpus}"

    def environment(self, base: dict[str, str]) -> dict[str, str]:
        env = dict(base)
        if self.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus)
        # XLA sizes its thread pools from the affinity mask; OpenMP/BLAS pools from the machine's
        # core count, so they are told (unless the user already did).
        env.setdefault("OMP_NUM_THREADS", str(len(self.cpus)))
        return env


def split_devices(parallel: int, cpus: Sequence[int], gpus: Sequence[str]) -> list[DeviceShare]:
    """`parallel` disjoint shares: the same number of GPUs each (runs of one sweep should see the
    same devices; a remainder stays unused) and the CPU cores as evenly as they go."""
    if len(cpus) < parallel:
        raise ExecutorError(f"--parallel {parallel} needs a CPU core per run; this process may use "
                            f"{len(cpus)} ({_ranges(cpus)})")
    if gpus and len(gpus) < parallel:
        raise ExecutorError(f"--parallel {parallel} needs a GPU per run; found {len(gpus)} "
                            "(CUDA_VISIBLE_DEVICES, else nvidia-smi)")
    per_run = len(gpus) // parallel
    return [DeviceShare(cpus=tuple(cpus[k * len(cpus) // parallel:(k + 1) * len(cpus) // parallel]),
                        gpus=tuple(gpus[k * per_run:(k + 1) * per_run]) if gpus else None)
            for k in range(parallel)]


class LocalExecutor(Executor):
    """Runs on this machine, `parallel` at a time, each in its own `python -m lmjax.cli train
    RUN_DIR/config.yaml` process whose output is appended to RUN_DIR/train.log.

    A subprocess per run isolates one run's crash (and memory) from the others. With parallel > 1
    each run is pinned to its own share (`split_devices`): CUDA_VISIBLE_DEVICES for its GPUs and
    the CPU affinity mask (what taskset sets) for its cores, which also confines its data-loading
    threads; parallel = 1 gives the run the whole machine.
    """

    def __init__(self, parallel: int = 1, python: str = sys.executable, gpus: Sequence[str] | None = None,
                 cpus: Sequence[int] | None = None):
        _check_parallel(parallel)
        self.python, self.parallel = python, parallel
        self.shares: list[DeviceShare | None] = [None]
        if parallel > 1:
            self.shares = list(split_devices(parallel, sorted(os.sched_getaffinity(0)) if cpus is None else list(cpus),
                                             visible_gpus() if gpus is None else list(gpus)))

    def execute(self, runs: Sequence[PlannedRun]) -> dict[str, str]:
        failures: dict[str, str] = {}
        waiting, free = list(enumerate(runs, start=1)), list(self.shares)
        running: dict[subprocess.Popen, tuple[PlannedRun, DeviceShare | None, float]] = {}
        try:
            while waiting or running:
                while waiting and free:
                    (i, run), share = waiting.pop(0), free.pop(0)
                    start = _announce(i, len(runs), run, f" on {share.describe()}" if share else "")
                    running[self._start(run, share)] = (run, share, start)
                time.sleep(POLL_SECONDS)
                for process in [p for p in running if p.poll() is not None]:
                    run, share, start = running.pop(process)
                    free.append(share)
                    if process.returncode == 0:
                        _report_done(run, start)
                    else:
                        failures[run.name] = f"exit code {process.returncode}: {_last_line(run.run_dir / 'train.log')}"
                        print(f"      failed: {run.name}: {failures[run.name]}", flush=True)
        except KeyboardInterrupt:
            _stop(list(running))
            raise
        return failures

    def _start(self, run: PlannedRun, share: DeviceShare | None) -> subprocess.Popen:
        command = [self.python, "-m", "lmjax.cli", "train", str(run.run_dir / "config.yaml")]
        with open(run.run_dir / "train.log", "a") as log:
            if share is None:
                return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
            log.write(f"# lmjax sweep, {time.strftime('%Y-%m-%d %H:%M:%S')}, {share.describe()}: {shlex.join(command)}\n")
            log.flush()
            return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=share.environment(dict(os.environ)),
                                    preexec_fn=partial(os.sched_setaffinity, 0, share.cpus))


def _stop(processes: list[subprocess.Popen]) -> None:
    # Let each run save a checkpoint and stop between steps (the trainer handles SIGINT).
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
    deadline = time.monotonic() + CHILD_SHUTDOWN_SECONDS
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


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


# ----------------------------------------------------------------------------- SLURM


@dataclass(frozen=True)
class SlurmResources:
    """What each array task (one run) asks SLURM for. The defaults ask for no GPU and the
    cluster's default CPUs per task (one, unless the cluster says otherwise), so a task fits any
    node; anything else through sbatch's SBATCH_* variables (SBATCH_ACCOUNT, SBATCH_MEM_PER_NODE...)."""

    cpus: int | None = None  # --cpus-per-task
    gpus: int = 0  # --gres=gpu:N
    partition: str | None = None
    time: str | None = None  # --time, e.g. 4:00:00 (default: the partition's)

    def __post_init__(self):
        if self.cpus is not None and self.cpus < 1:
            raise ExecutorError(f"--slurm-cpus must be >= 1 (CPUs per run); got {self.cpus}")
        if self.gpus < 0:
            raise ExecutorError(f"--slurm-gpus must be >= 0 (GPUs per run); got {self.gpus}")

    def sbatch_options(self) -> list[str]:
        options = [f"--cpus-per-task={self.cpus}"] if self.cpus else []
        options += [f"--gres=gpu:{self.gpus}"] if self.gpus else []
        options += [f"--partition={self.partition}"] if self.partition else []
        return options + ([f"--time={self.time}"] if self.time else [])


class SlurmExecutor(Executor):
    """Submits one job array (launch/slurm_sweep.sbatch): array task i trains the i-th run of
    sweep_dir/slurm/array_runs_K.txt with this interpreter (`sys.executable -m lmjax.cli train`),
    its output appended to RUN_DIR/train.log; SLURM's own log per task in sweep_dir/slurm/.
    `parallel` caps the tasks running at once (sbatch --array=0-N%parallel).

    Waits by polling squeue until no task is left, then reads the run directories. Preempted tasks
    are requeued (--requeue) and resume from their checkpoints. Ctrl-C cancels the array and waits
    for its runs to save a checkpoint (SIGTERM); a rerun of the sweep resubmits what is unfinished.
    """

    def __init__(self, resources: SlurmResources = SlurmResources(), parallel: int | None = None,
                 python: str = sys.executable, poll_seconds: float = 10.0, script: Path = SWEEP_SCRIPT,
                 require_slurm: bool = True):
        _check_parallel(parallel)
        for tool in ("sbatch", "squeue", "scancel") if require_slurm else ():  # not for a dry run
            if shutil.which(tool) is None:
                raise ExecutorError(f"--executor slurm needs SLURM's {tool} on PATH (run it on a SLURM login node); not found")
        if not Path(script).is_file():
            raise ExecutorError(f"--executor slurm submits {script}, which is missing: install lmjax from a clone "
                                "of its repository (pip install -e .)")
        self.resources, self.parallel, self.poll_seconds = resources, parallel, poll_seconds
        self.python, self.script = os.path.abspath(python), Path(script).resolve()

    def execute(self, runs: Sequence[PlannedRun]) -> dict[str, str]:
        job = self.submit(runs)
        try:
            self.wait(job, runs)
        except KeyboardInterrupt:
            subprocess.run(["scancel", job], capture_output=True)
            # Until its tasks are gone: a rerun must not start a run whose cancelled task is still saving.
            print(f"cancelled job array {job}; waiting for its runs to save a checkpoint and stop "
                  "(Ctrl-C again: stop waiting)", file=sys.stderr, flush=True)
            self.wait(job, runs)
            raise
        return {run.name: f"array task {job}_{i} left no completed summary.json; "
                          f"{run.run_dir}/train.log: {_last_line(run.run_dir / 'train.log')}"
                for i, run in enumerate(runs) if read_completed_summary(run.run_dir) is None}

    def prepare(self, runs: Sequence[PlannedRun]) -> tuple[Path, str, list[str]]:
        """(the runs file, its text, the sbatch command) for `runs`; writes nothing."""
        if not runs:
            raise ExecutorError("no runs to submit")
        # Run directories are sweep_dir/runs/<name>. Each submission gets its own runs file: a
        # task of an earlier array still pending must not read a newer list.
        slurm_dir = runs[0].run_dir.resolve().parent.parent / "slurm"
        k = 1
        while (slurm_dir / f"array_runs_{k}.txt").exists():
            k += 1
        runs_file = slurm_dir / f"array_runs_{k}.txt"
        text = "".join(f"{run.run_dir.resolve()}\n" for run in runs)
        array = f"0-{len(runs) - 1}" + (f"%{self.parallel}" if self.parallel else "")
        command = ["sbatch", "--parsable", f"--array={array}", f"--output={slurm_dir}/%A_%a.out",
                   f"--export=ALL,LMJAX_PYTHON={self.python}", *self.resources.sbatch_options(),
                   str(self.script), str(runs_file)]
        return runs_file, text, command

    def submit(self, runs: Sequence[PlannedRun]) -> str:
        """Writes the runs file, submits the array; returns its job id."""
        runs_file, text, command = self.prepare(runs)
        runs_file.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(runs_file, text)
        print(f"+ {shlex.join(command)}", flush=True)
        submitted = subprocess.run(command, capture_output=True, text=True)
        job = submitted.stdout.strip().split(";")[0]  # --parsable: "JOBID" or "JOBID;CLUSTER"
        if submitted.returncode != 0 or not job.isdigit():
            why = (submitted.stderr.strip() or submitted.stdout.strip() or f"exit code {submitted.returncode}").splitlines()[-1]
            raise ExecutorError(f"sbatch refused the job array: {why}")
        print(f"submitted job array {job}: {len(runs)} runs, one array task each; SLURM's logs: "
              f"{runs_file.parent}/{job}_<task>.out; each run's output: its train.log", flush=True)
        return job

    def wait(self, job: str, runs: Sequence[PlannedRun]) -> None:
        """Until SLURM lists no task of `job` (the run directories then say how each ended)."""
        said = ""
        while True:
            states = self._states(job)
            if not states:
                return
            counts = ", ".join(f"{n} {state.lower()}" for state, n in sorted(Counter(states).items()))
            done = sum(read_completed_summary(run.run_dir) is not None for run in runs)
            line = f"job array {job}: {counts}; {done} of {len(runs)} runs completed"
            if line != said:
                print(line, flush=True)
                said = line
            time.sleep(self.poll_seconds)

    def _states(self, job: str) -> list[str]:
        listed = subprocess.run(["squeue", "--noheader", "--array", f"--jobs={job}", "--format=%T"],
                                capture_output=True, text=True)
        if listed.returncode == 0:
            return listed.stdout.split()
        if "Invalid job id" in listed.stderr:  # finished and already forgotten by the controller
            return []
        # The controller may be restarting: keep waiting (Ctrl-C stops), but say why nothing moves.
        print(f"warning: squeue failed ({listed.stderr.strip() or listed.returncode}); retrying", file=sys.stderr)
        return ["UNKNOWN"]


# ----------------------------------------------------------------------------- the command line


def add_slurm_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--slurm-cpus", type=int, default=None, metavar="N",
                        help="slurm: CPUs per run (--cpus-per-task; default: the cluster's default, usually 1)")
    parser.add_argument("--slurm-gpus", type=int, default=None, metavar="N", help="slurm: GPUs per run (--gres=gpu:N; default 0)")
    parser.add_argument("--slurm-partition", default=None, metavar="NAME", help="slurm: partition (default: the cluster's default)")
    parser.add_argument("--slurm-time", default=None, metavar="TIME", help="slurm: time limit per run, e.g. 4:00:00")


def slurm_resources(args: argparse.Namespace) -> SlurmResources | None:
    """The --slurm-* arguments (None when none was given)."""
    given = {"cpus": args.slurm_cpus, "gpus": args.slurm_gpus, "partition": args.slurm_partition, "time": args.slurm_time}
    if all(value is None for value in given.values()):
        return None
    return SlurmResources(**{k: v for k, v in given.items() if v is not None})


def make_executor(name: str, parallel: int | None = None, resources: SlurmResources | None = None) -> Executor:
    """The executor `lmjax sweep --executor NAME [--parallel N] [--slurm-*]` asks for."""
    if name == "local":
        if resources is not None:
            raise ExecutorError("--slurm-cpus/--slurm-gpus/--slurm-partition/--slurm-time apply to --executor slurm only")
        return LocalExecutor(parallel=1 if parallel is None else parallel)
    if name == "slurm":
        return SlurmExecutor(resources or SlurmResources(), parallel=parallel)
    raise ExecutorError(f"unknown executor '{name}'; expected one of {', '.join(EXECUTORS)}")
