"""One run per run directory: `run_dir/lock`, held by the run while it trains.

Two `lmjax train` commands on one run directory would interleave metrics, race on checkpoint
step numbers and overwrite each other's config. The lock belongs to the run, not to a process:
process 0 takes it, the other processes of a multi-process run only learn whether it did (so
they never refuse each other, and all of them stop when it was refused).

The file is created atomically (O_EXCL) and holds the holder's host, pid and start time as
JSON. The holder refreshes its mtime every `heartbeat_s` from a daemon thread. A lock is stale,
and taken over, when its holder is on this host and its pid is gone, or when its heartbeat is
older than `stale_after_s` (a holder on another host, or a pid since reused); a lock whose file
was cut short counts by its mtime alone. Released on exit, on exceptions and at interpreter exit.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from lmjax.errors import UserError

HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # ten missed heartbeats: the holder is gone (or frozen past any use)


class RunLockedError(UserError):
    """Another run holds the run directory's lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _slurm_incarnation() -> str | None:
    """JOBID.RESTARTS under SLURM: a requeued job (after a node failure, on another node) must not
    wait for the heartbeat of its own previous incarnation to go stale."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") and f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
    job = job or os.environ.get("SLURM_JOB_ID")
    return f"{job}.{os.environ.get('SLURM_RESTART_COUNT', '0')}" if job else None


class RunLock:
    def __init__(self, run_dir: str | Path, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "lock"
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       "token": uuid.uuid4().hex, "slurm_job": _slurm_incarnation()}
        self._inode: int | None = None  # of the file we created: what we refresh and remove
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ public
    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> "RunLock":
        """Takes the lock on process 0 (raises RunLockedError naming the holder when another run
        holds it); in a multi-process run every process raises when process 0 was refused."""
        import jax  # the caller's processes are already up; kept out of a plain `import` of this module

        refusal = None
        if jax.process_index() == 0:
            try:
                self._take()
            except UserError as e:  # held by another run, or run_dir is a file: every process must stop
                refusal = e
        if jax.process_count() > 1:
            import numpy as np
            from jax.experimental import multihost_utils

            refused = bool(multihost_utils.broadcast_one_to_all(np.int32(refusal is not None)))
            if refused and refusal is None:
                raise RunLockedError(f"run_dir {self.run_dir}: process 0 could not take its lock (its error names the holder)")
        if refusal is not None:
            raise refusal
        return self

    def release(self) -> None:
        """Stops the heartbeat and removes the lock if it is still ours (one taken over by
        another run, after a freeze longer than `stale_after_s`, is theirs now)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._inode is not None:
            if self._still_ours():
                self.path.unlink(missing_ok=True)
            self._inode = None
            atexit.unregister(self.release)

    # ------------------------------------------------------------------ taking it
    def _take(self) -> None:
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise UserError(f"run_dir {self.run_dir} is a file; expected a directory (or a path that does not exist)")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # a takeover race with another starter is settled by O_EXCL on the next try
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder, stat = self._read_holder()
                if stat is None:
                    continue  # released meanwhile
                if not self._is_stale(holder, stat):
                    raise RunLockedError(self._describe(holder, stat)) from None
                self._take_over(stat)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.holder) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self._inode = os.stat(self.path).st_ino
            self._stop.clear()
            self._thread = threading.Thread(target=self._heartbeat, name="lmjax-run-lock", daemon=True)
            self._thread.start()
            atexit.register(self.release)
            return
        raise RunLockedError(f"run_dir {self.run_dir}: could not take {self.path} (other runs keep taking it over)")

    def _read_holder(self) -> tuple[dict | None, os.stat_result | None]:
        """(the holder's JSON or None when unreadable, the file's stat or None when gone). A lock
        read between its creation and its write is empty: read again for up to a second."""
        stat = None
        for _ in range(10):
            try:
                stat = os.stat(self.path)
                holder = json.loads(self.path.read_text())
                if isinstance(holder, dict):
                    return holder, stat
            except FileNotFoundError:
                return None, None
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        return None, stat

    def _is_stale(self, holder: dict | None, stat: os.stat_result) -> bool:
        if time.time() - stat.st_mtime > self.stale_after_s:
            return True  # no heartbeat: the holder is gone, whatever its host
        if holder is None:
            return False  # unreadable but fresh: treat as held, say so
        job = _slurm_incarnation()
        if job and holder.get("slurm_job") and holder["slurm_job"] != job and holder["slurm_job"].split(".")[0] == job.split(".")[0]:
            return True  # an earlier incarnation of this requeued SLURM job: gone, wherever it ran
        same_host = holder.get("host") == socket.gethostname()
        return same_host and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"])

    def _take_over(self, judged: os.stat_result) -> None:
        """Moves the stale lock out of the way, unless what is there now is not the file judged
        stale (another starter took it over first): then that one is put back."""
        moved = self.run_dir / f"lock.stale-{self.holder['token']}"
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return
        if os.stat(moved).st_ino != judged.st_ino:
            try:
                os.link(moved, self.path)
            except FileExistsError:
                pass
        moved.unlink(missing_ok=True)

    def _describe(self, holder: dict | None, stat: os.stat_result) -> str:
        age = time.time() - stat.st_mtime
        if holder is None:
            who = f"an unreadable lock refreshed {age:.0f}s ago"
        else:
            who = f"host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('started')}"
        return (f"run_dir {self.run_dir} is in use by another lmjax run ({who}); wait for it to end, or remove "
                f"{self.path} if that process is gone (a lock without a heartbeat for {self.stale_after_s:.0f}s is taken over)")

    # ------------------------------------------------------------------ holding it
    def _still_ours(self) -> bool:
        try:
            return os.stat(self.path).st_ino == self._inode and json.loads(self.path.read_text()).get("token") == self.holder["token"]
        except (OSError, ValueError, AttributeError):
            return False

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if not self._still_ours():
                return  # taken over after a freeze: refreshing it would keep a stranger's lock alive
            try:
                os.utime(self.path)
            except OSError:
                return
