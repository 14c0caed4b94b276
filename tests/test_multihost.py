"""The multi-host path, for real: several `lmjax train` processes on this machine, joined by
jax.distributed over 127.0.0.1 with gloo CPU collectives (`launch/local.py`), checked against one
process holding all 8 devices.

Each test starts 2 processes x 4 fake CPU devices. The data cache is the session's, already
built by in-process runs, so the processes only compile and train.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from lmjax.config import load_config
from lmjax.evaluate import load_run
from lmjax.train.loop import train

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("launch_local", ROOT / "launch" / "local.py")
launch_local = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(launch_local)


def read_losses(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def start_processes(args: list[str], log_dir: Path, n: int = 2, main: tuple[str, ...] = ("-m", "lmjax.cli")) -> list[subprocess.Popen]:
    """`lmjax ARGS` (`python MAIN ARGS`) as n processes of one run (the launcher's environments),
    logs in log_dir."""
    log_dir.mkdir(parents=True, exist_ok=True)
    envs = launch_local.process_environments(n, 8 // n, "cpu", launch_local._free_port())
    processes = []
    for i, env in enumerate(envs):
        with open(log_dir / f"process_{i}.log", "w") as log:
            processes.append(subprocess.Popen([sys.executable, *main, *args], env={**os.environ, **env},
                                              stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
    return processes


def log_tails(log_dir: Path, chars: int = 1500) -> str:
    """The end of every process's log: what a failed assertion on exit codes shows."""
    return "\n".join(f"--- {path.name}\n{path.read_text()[-chars:]}" for path in sorted(log_dir.glob("process_*.log")))


def wait_all(processes: list[subprocess.Popen], timeout: float = 240) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for p in processes:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for q in processes:
                q.kill()
            raise AssertionError("a process hung") from None
    return codes


def last_line(path: Path) -> str:
    return [line for line in path.read_text().splitlines() if line.strip()][-1]


def children_of(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def wait_for_step(run_dir: Path, step: int, processes: list[subprocess.Popen], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.exists() and any(s >= step for s in read_losses(run_dir)):
            return
        assert all(p.poll() is None for p in processes), "a process ended before the step"
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached")


def test_launcher_dry_run_prints_each_process_command():
    out = subprocess.run([sys.executable, "launch/local.py", "--processes", "2", "--devices-per-process", "4", "--port", "1234",
                          "--dry-run", "--", "train", "configs/dense_tiny.yaml", "run_dir=x"],
                         capture_output=True, text=True, cwd=ROOT, check=True).stdout.splitlines()
    assert len(out) == 2
    for i, line in enumerate(out):
        assert f"LMJAX_COORDINATOR=127.0.0.1:1234 LMJAX_NUM_PROCESSES=2 LMJAX_PROCESS_ID={i} JAX_PLATFORMS=cpu" in line
        assert "--xla_force_host_platform_device_count=4" in line
        assert line.endswith(f"{sys.executable} -m lmjax.cli train configs/dense_tiny.yaml run_dir=x")


def test_two_processes_equal_one_process_and_its_checkpoints(tmp_path, tiny_overrides):
    """data=2 spans the processes (each holds one data row of 4 fsdp devices)."""
    overrides = tiny_overrides + ["mesh.data=2", "mesh.fsdp=4"]
    train(load_config(None, overrides + [f"run_dir={tmp_path / 'one'}"]))
    code = subprocess.run([sys.executable, "launch/local.py", "--processes", "2", "--devices-per-process", "4",
                           "--log-dir", str(tmp_path / "logs"), "--", "train", "configs/dense_tiny.yaml",
                           f"run_dir={tmp_path / 'two'}", *overrides], cwd=ROOT, timeout=240).returncode
    assert code == 0, (tmp_path / "logs" / "process_0.log").read_text()[-2000:]
    one, two = read_losses(tmp_path / "one"), read_losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, 7))
    for step in one:
        np.testing.assert_allclose(two[step], one[step], rtol=1e-5)
    # Only process 0 writes the metrics: each step once.
    assert len((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) == len(one) + 1  # + the eval line
    assert "done: eval loss" not in (tmp_path / "logs" / "process_1.log").read_text()
    # The checkpoint the two processes wrote together holds the same parameters.
    a, b = load_run(tmp_path / "one").params, load_run(tmp_path / "two").params
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-5)  # Adam magnifies reduction-order noise
    # Another number of processes: the 2-process checkpoint continues in this one process
    # (extended by two steps, as the 1-process run is).
    for name in ("one", "two"):
        train(load_config(None, overrides + [f"run_dir={tmp_path / name}", "train.steps=8"]))
    one, two = read_losses(tmp_path / "one"), read_losses(tmp_path / "two")
    for step in (7, 8):
        np.testing.assert_allclose(two[step], one[step], rtol=1e-5)


@pytest.mark.slow  # 1.5 min of two processes: kept out of the README's 15-minute suite, run by CI
def test_sigterm_to_one_process_stops_both_at_the_same_step_and_resumes(tmp_path, tiny_overrides):
    """fsdp=8 spans the processes. SIGTERM reaches process 1 only; both save one step and exit
    143; the rerun continues the uninterrupted curve."""
    overrides = tiny_overrides + ["mesh.data=1", "mesh.fsdp=8", "train.steps=40", "train.checkpoint_every=20"]
    args = ["train", "configs/dense_tiny.yaml", f"run_dir={tmp_path / 'two'}", *overrides]
    processes = start_processes(args, tmp_path / "logs")
    wait_for_step(tmp_path / "two", 3, processes)
    # As under SLURM (scancel, preemption), the signal also reaches the coordination service's
    # process, which must outlive the save; here process 1 is the only trainer signalled.
    coordinators = children_of(processes[0].pid)
    assert len(coordinators) == 1
    for pid in coordinators:
        os.kill(pid, signal.SIGTERM)
    processes[1].send_signal(signal.SIGTERM)
    assert wait_all(processes) == [143, 143], log_tails(tmp_path / "logs")
    stops = [last_line(tmp_path / "logs" / f"process_{i}.log") for i in range(2)]
    assert stops[0] == stops[1] and stops[0].startswith("stopped by SIGTERM at step "), stops
    stopped_at = int(stops[0].split("at step ")[1].split(";")[0])
    assert stopped_at < 40 and (tmp_path / "two" / "checkpoints" / str(stopped_at)).is_dir()

    assert wait_all(start_processes(args, tmp_path / "logs_resumed")) == [0, 0], log_tails(tmp_path / "logs_resumed")
    train(load_config(None, overrides + [f"run_dir={tmp_path / 'one'}"]))
    one, two = read_losses(tmp_path / "one"), read_losses(tmp_path / "two")
    assert sorted(two) == sorted(one) == list(range(1, 41))
    for step in one:
        np.testing.assert_allclose(two[step], one[step], rtol=1e-5, err_msg=f"step {step}")


# `lmjax` whose process 1 disconnects from the coordination service (jax's distributed shutdown)
# only after a pause longer than the service's grace after process 0's farewell: a busy machine.
_SLOW_TO_DISCONNECT = """
import os, sys, time
from jax._src.distributed import global_state
from lmjax import distributed
from lmjax.cli import main
disconnect = global_state.shutdown
def slow_disconnect():
    if global_state.client is not None and os.environ["LMJAX_PROCESS_ID"] == "1":
        time.sleep(distributed._FAREWELL_GRACE_S + 10)
    disconnect()
global_state.shutdown = slow_disconnect
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow  # a minute of two processes and 25 s of waiting
def test_a_process_slow_to_disconnect_at_the_end_exits_normally(tmp_path, tiny_overrides):
    """The coordination service outlives every process's connection: a process that disconnects
    late is not aborted (SIGABRT, a C++ stack dump) by the service ending under it."""
    args = ["train", "configs/dense_tiny.yaml", f"run_dir={tmp_path / 'run'}", *tiny_overrides, "mesh.data=2", "mesh.fsdp=4"]
    processes = start_processes(args, tmp_path / "logs", main=("-c", _SLOW_TO_DISCONNECT))
    assert wait_all(processes) == [0, 0], log_tails(tmp_path / "logs")
    assert sorted(read_losses(tmp_path / "run")) == list(range(1, 7))


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_process_ends_the_other_within_the_timeout(tmp_path, tiny_overrides, victim):
    """Process 0 hosts the coordination service's process; killing either leaves the other a
    one-line error naming the lost process, within train.peer_timeout_s, and no hang."""
    overrides = tiny_overrides + ["mesh.data=2", "mesh.fsdp=4", "train.steps=100000", "train.checkpoint_every=1000",
                                  "train.peer_timeout_s=30"]  # generous: 2 busy cores
    processes = start_processes(["train", "configs/dense_tiny.yaml", f"run_dir={tmp_path / 'run'}", *overrides], tmp_path / "logs")
    wait_for_step(tmp_path / "run", 3, processes)
    processes[victim].kill()
    killed_at = time.monotonic()
    survivor = processes[1 - victim]
    code = survivor.wait(timeout=90)
    assert code != 0 and time.monotonic() - killed_at < 30 + 20
    line = last_line(tmp_path / "logs" / f"process_{1 - victim}.log")
    assert line.startswith(f"error: process {victim} of 2 stopped responding"), line
    assert "Check failure stack trace" not in (tmp_path / "logs" / f"process_{1 - victim}.log").read_text()


@pytest.mark.slow
def test_a_locked_run_dir_stops_every_process_at_once(tmp_path, tiny_overrides):
    """The lock belongs to the run: process 0 takes it; refused, every process exits 2."""
    from lmjax.train.run_lock import RunLock

    run_dir = tmp_path / "run"
    with RunLock(run_dir):  # another run (this test process) holds it
        start = time.monotonic()
        processes = start_processes(["train", "configs/dense_tiny.yaml", f"run_dir={run_dir}", *tiny_overrides], tmp_path / "logs")
        assert wait_all(processes, timeout=120) == [2, 2]
        assert time.monotonic() - start < 60
    errors = [[line for line in (tmp_path / "logs" / f"process_{i}.log").read_text().splitlines() if line.startswith("error:")]
              for i in range(2)]
    assert f"pid {os.getpid()}" in errors[0][0] and "lock" in errors[1][0], errors
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "config.yaml").exists()
