"""The run directory's lock: one run per directory, stale locks taken over, released on exit."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmjax.train.run_lock import RunLock, RunLockedError

ROOT = Path(__file__).resolve().parent.parent


def _write_lock(run_dir: Path, host: str, pid: int, age_s: float = 0.0) -> Path:
    """A lock as another run would have left it, its heartbeat `age_s` seconds old."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "lock"
    path.write_text(json.dumps({"host": host, "pid": pid, "started": "2026-01-01T00:00:00+0000", "token": "theirs"}) + "\n")
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def _holder(run_dir: Path) -> dict:
    return json.loads((run_dir / "lock").read_text())


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_run_is_refused_naming_the_holder_and_release_frees_it(tmp_path):
    run_dir = tmp_path / "run"
    first = RunLock(run_dir).acquire()
    assert _holder(run_dir)["pid"] == os.getpid() and _holder(run_dir)["host"] == socket.gethostname()
    with pytest.raises(RunLockedError) as refused:
        RunLock(run_dir).acquire()
    message = str(refused.value)
    assert "\n" not in message and f"host {socket.gethostname()}, pid {os.getpid()}," in message and str(run_dir) in message
    first.release()
    assert not (run_dir / "lock").exists()
    with RunLock(run_dir):  # free again
        assert (run_dir / "lock").exists()
    assert not (run_dir / "lock").exists()


def test_released_when_the_run_raises(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with RunLock(tmp_path):
            1 / 0
    assert not (tmp_path / "lock").exists()


def test_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    _write_lock(tmp_path, socket.gethostname(), _dead_pid())
    with RunLock(tmp_path):
        assert _holder(tmp_path)["pid"] == os.getpid()


def test_lock_from_another_host_is_taken_over_only_when_its_heartbeat_is_stale(tmp_path):
    _write_lock(tmp_path, "node-elsewhere", 4242, age_s=5.0)
    with pytest.raises(RunLockedError, match="host node-elsewhere, pid 4242,"):
        RunLock(tmp_path, stale_after_s=300).acquire()
    assert _holder(tmp_path)["token"] == "theirs"  # refused: left as it was
    _write_lock(tmp_path, "node-elsewhere", 4242, age_s=301.0)
    with RunLock(tmp_path, stale_after_s=300):
        assert _holder(tmp_path)["pid"] == os.getpid()


def test_a_live_pid_on_this_host_with_a_stale_heartbeat_is_taken_over(tmp_path):
    """A reused pid (or a holder frozen for minutes) cannot keep a run directory forever."""
    _write_lock(tmp_path, socket.gethostname(), os.getppid(), age_s=400.0)
    with RunLock(tmp_path, stale_after_s=300):
        assert _holder(tmp_path)["pid"] == os.getpid()


def test_unreadable_lock_counts_by_its_heartbeat(tmp_path):
    (tmp_path / "lock").write_text("{not json")
    with pytest.raises(RunLockedError, match=r"\(an unreadable lock refreshed \ds ago\)"):
        RunLock(tmp_path).acquire()
    old = time.time() - 400
    os.utime(tmp_path / "lock", (old, old))
    with RunLock(tmp_path, stale_after_s=300):
        assert _holder(tmp_path)["pid"] == os.getpid()


def test_heartbeat_refreshes_the_lock_and_a_lock_taken_over_is_not_removed(tmp_path):
    lock = RunLock(tmp_path, heartbeat_s=0.05).acquire()
    old = time.time() - 1000
    os.utime(tmp_path / "lock", (old, old))
    deadline = time.time() + 10
    while (tmp_path / "lock").stat().st_mtime < old + 500 and time.time() < deadline:
        time.sleep(0.05)
    assert time.time() - (tmp_path / "lock").stat().st_mtime < 10
    # Another run took it over (after a long freeze of this one): it is theirs, not released by us.
    (tmp_path / "lock").unlink()
    _write_lock(tmp_path, "node-elsewhere", 4242)
    lock.release()
    assert _holder(tmp_path)["token"] == "theirs"


def test_lmjax_train_on_a_locked_run_dir_fails_at_once(tmp_path, tiny_overrides):
    """The lock is held by this (live) test process: `lmjax train` there stops before writing anything."""
    run_dir = tmp_path / "run"
    _write_lock(run_dir, socket.gethostname(), os.getpid())
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "lmjax.cli", "train", "configs/dense_tiny.yaml", *tiny_overrides,
                             "train.steps=1", f"run_dir={run_dir}"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    elapsed = time.monotonic() - start
    assert result.returncode == 2, result.stderr
    err = result.stderr.strip()
    assert "\n" not in err, err
    assert err.startswith(f"error: run_dir {run_dir} is in use by another lmjax run (host {socket.gethostname()}, pid {os.getpid()},")
    assert sorted(p.name for p in run_dir.iterdir()) == ["lock"] and _holder(run_dir)["token"] == "theirs"
    assert elapsed < 60, f"took {elapsed:.0f}s to refuse"
