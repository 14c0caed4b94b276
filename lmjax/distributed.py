"""Multi-host start-up (`jax.distributed.initialize`) and a watchdog for processes that die.

Where the processes come from:
- TPU pods and SLURM `srun` steps: jax detects the coordinator and process ids itself (its cluster
  plugins read the TPU metadata / SLURM_* variables); we only need to ask it to.
- Anywhere else: LMJAX_COORDINATOR (host:port), LMJAX_NUM_PROCESSES, LMJAX_PROCESS_ID
  (`launch/local.py` sets them for N processes on one machine).
A single process with none of these set runs without initialising anything.

A dead peer must not hang the others. A collective waiting for a process that was killed blocks
forever (gloo on CPU) and jax's coordination service eventually aborts the survivors with a
C++ stack dump. So every process runs a watchdog thread that publishes a heartbeat counter in
the coordination service's key-value store and watches everyone else's: a counter that has not
moved for `peer_timeout_s` (or a coordinator that no longer answers for that long) ends this
process at once with a one-line error naming the lost process. jax's own heartbeat timeout is set
later than ours, so ours speaks first. A rerun resumes from the last complete checkpoint.

Decisions that change control flow are agreed without the key-value store: the train step
reduces every process's stop flag (`lmjax.train.step`), and everything else a process decides on
(a non-finite loss, the end of the run) is read from replicated step outputs, identical everywhere.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import jax

from lmjax.errors import UserError

DEFAULT_PEER_TIMEOUT_S = 120.0
EXIT_PEER_LOST = 3  # distinct from a user error (2) and a crash (1): a scheduler may retry it
_JAX_HEARTBEAT_MARGIN_S = 60  # jax's own verdict comes this long after ours
_HEARTBEAT_KEY, _FAILED_KEY = "lmjax/heartbeat/", "lmjax/failed/"
_EXIT_BARRIER_MS = 10 * 60 * 1000  # processes finish the same step; the slowest writes its last shards
_FAREWELL_GRACE_S = 15.0  # after every process has disconnected: replies still in flight
_FIRST_BARRIER_MS = 24 * 3600 * 1000  # tokenizing a large corpus takes hours; a failure ends it sooner

_initialized = False
_watchdog: "_PeerWatchdog | None" = None
_coordinator: "subprocess.Popen | None" = None


def _under_srun() -> bool:
    """One task of a multi-task `srun` step (not a batch script that merely has several tasks)."""
    return "SLURM_STEP_ID" in os.environ and int(os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", "1"))) > 1


def _on_tpu_pod() -> bool:
    """A multi-host TPU slice: GKE sets TPU_WORKER_HOSTNAMES; TPU VMs keep it in their metadata."""
    if os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
        return True
    from jax._src.clusters.cloud_tpu_cluster import GceTpuCluster

    return GceTpuCluster.is_env_present() and len(GceTpuCluster._get_worker_list_in_slice()) > 1


def _from_environment() -> tuple[str, int, int, Any] | None:
    """(coordinator address, number of processes, this process's id, its local device ids), or
    None for a single process."""
    explicit = os.environ.get("LMJAX_COORDINATOR")
    if explicit:
        try:
            num_processes = int(os.environ["LMJAX_NUM_PROCESSES"])
            process_id = int(os.environ["LMJAX_PROCESS_ID"])
        except (KeyError, ValueError):
            raise UserError(
                "LMJAX_COORDINATOR is set: LMJAX_NUM_PROCESSES and LMJAX_PROCESS_ID must be set to integers too"
            ) from None
        if not 0 <= process_id < num_processes:
            raise UserError(f"LMJAX_PROCESS_ID={process_id} is not in [0, LMJAX_NUM_PROCESSES={num_processes})")
        return explicit, num_processes, process_id, None
    if _under_srun() or _on_tpu_pod():
        from jax._src.clusters import ClusterEnv

        address, n, process_id, local_device_ids = ClusterEnv.auto_detect_unset_distributed_params(None, None, None, None, None, 300)
        if _under_srun() and os.environ.get("SLURM_STEP_TASKS_PER_NODE", os.environ.get("SLURM_NTASKS_PER_NODE", "1")) == "1":
            local_device_ids = None  # one task per node sees all its GPUs (jax would pin it to GPU SLURM_LOCALID)
        return address, n, process_id, local_device_ids
    return None


def initialize(peer_timeout_s: float = DEFAULT_PEER_TIMEOUT_S) -> None:
    """Starts jax.distributed when the environment describes several processes, with the
    coordination service in a process of its own and the watchdog (see the module docstring)."""
    global _initialized
    if _initialized:
        return
    if peer_timeout_s <= 0:
        raise UserError(f"train.peer_timeout_s must be positive, got {peer_timeout_s}")
    found = _from_environment()
    _initialized = True
    if found is None or found[1] == 1:
        return
    address, num_processes, process_id, local_device_ids = found
    heartbeat_s = int(peer_timeout_s) + _JAX_HEARTBEAT_MARGIN_S
    # Stops on SIGTERM are agreed through the train step; jax's preemption notifier would install
    # a competing C++ SIGTERM handler. Recoverability: a task's death is ours to report.
    jax.config.update("jax_enable_preemption_service", False)
    jax.config.update("jax_enable_recoverability", True)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU backends only
    bind = None
    if process_id == 0:
        _start_coordinator(address, num_processes, heartbeat_s, peer_timeout_s)
        bind = f"127.0.0.1:{_free_port()}"  # jax's in-process service, unused: ours serves `address`
    jax.distributed.initialize(address, num_processes=num_processes, process_id=process_id, local_device_ids=local_device_ids,
                               cluster_detection_method="deactivate",  # everything is known: no second detection
                               heartbeat_timeout_seconds=heartbeat_s, coordinator_bind_address=bind)
    start_watchdog(peer_timeout_s)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_coordinator(address: str, num_processes: int, heartbeat_s: int, peer_timeout_s: float) -> None:
    """jax's coordination service in a child process: a training process that dies must not take
    the service down with it, or every other process aborts at once with a C++ stack dump instead
    of naming the lost process (what the watchdog is for)."""
    global _coordinator
    port = address.rsplit(":", 1)[-1]
    linger_s = peer_timeout_s + _JAX_HEARTBEAT_MARGIN_S  # outlive the others' watchdogs after process 0 dies
    command = [sys.executable, "-m", "lmjax.distributed", f"[::]:{port}", str(num_processes), str(heartbeat_s), str(linger_s)]
    _coordinator = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                    start_new_session=True)  # a process-group signal is for the trainers
    ready = _coordinator.stdout.readline().strip()
    if ready != "ready":
        _coordinator.wait()
        raise UserError(f"could not start the coordination service on port {port} of this host "
                        f"(is the port in use? set another in LMJAX_COORDINATOR): {ready or 'no output'}")


def _serve_coordinator(bind: str, num_processes: int, heartbeat_s: int, linger_s: float) -> None:
    """The child process of `_start_coordinator`: serves until process 0 says goodbye (then briefly,
    while the others disconnect) or dies (then long enough for everyone to notice)."""
    import signal

    from jax._src.lib import _jax

    # A scheduler's SIGTERM goes to every process of the job: the trainers save the agreed step,
    # which needs this service until they say goodbye (or process 0 dies: stdin closes).
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    port = int(bind.rsplit(":", 1)[-1])
    try:  # gRPC binds with SO_REUSEPORT, so a second service on a busy port would start: probe first
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::", port))
    except OSError as e:
        print(f"port {port}: {e.strerror} (a previous run's coordination service ends within "
              f"{linger_s:.0f} s of its process 0's death)", flush=True)
        return
    try:
        service = _jax.get_distributed_runtime_service(bind, num_processes, heartbeat_timeout=heartbeat_s, recoverable=True)
    except Exception as e:
        print(str(e).splitlines()[0] if str(e) else type(e).__name__, flush=True)
        return
    print("ready", flush=True)
    farewell = sys.stdin.readline().strip()
    time.sleep(_FAREWELL_GRACE_S if farewell == "done" else linger_s)
    service.shutdown()


@contextlib.contextmanager
def process_zero_first(what: str):
    """Process 0 runs the block before the others do (they wait at a barrier): caches it fills
    (the tokenizer, the tokenized corpus) are built once and found by the others, not built by
    every process at the same time. Without a shared file system each host builds its own."""
    if not (_initialized and jax.process_count() > 1):
        yield
        return
    from jax._src.distributed import global_state

    barrier = lambda: global_state.client.wait_at_barrier(f"lmjax/{what}", _FIRST_BARRIER_MS)  # noqa: E731
    if jax.process_index() != 0:
        barrier()
    yield
    if jax.process_index() == 0:
        barrier()


def finalize() -> None:
    """At a normal end (finished, or stopped by an agreed signal): waits for every process,
    disconnects from the coordination service together with them, then lets the service go.

    The service must outlive every process's connection: a process whose service vanishes while it
    is still connected aborts (SIGABRT, a C++ stack dump) instead of exiting normally, as one slow to
    exit on a busy machine did when the service ended a fixed grace after process 0's end. jax's
    shutdown barrier does not wait for recoverable tasks (ours are), so process 0 waits itself:
    the coordination service's GetAliveTasks returns once every other process is gone
    (disconnected, or dead and found so by the service's heartbeat)."""
    if not (_initialized and jax.process_count() > 1):
        return
    from jax._src.distributed import global_state

    global_state.client.wait_at_barrier("lmjax/exit", _EXIT_BARRIER_MS)
    if _watchdog is not None:
        _watchdog.stop()  # it uses the client, which is about to go
    if jax.process_index() == 0:
        global_state.client.get_live_nodes(list(range(jax.process_count())))  # blocks until only 0 is left
    global_state.shutdown()  # disconnect now, not at interpreter exit
    _say_farewell()


def _say_farewell() -> None:
    """Lets the coordination service's process end soon (instead of lingering for the others)."""
    if _coordinator is not None:
        try:
            _coordinator.stdin.write("done\n")
            _coordinator.stdin.flush()
        except OSError:  # it is already gone
            pass


def announce_failure(message: str, exit_code: int = 1) -> None:
    """Tells the other processes why this one stops (their watchdogs repeat it and exit), so an
    error raised on one process does not leave the others waiting in a collective."""
    if _watchdog is None:
        return
    _watchdog.failing = True  # this process reports its own error; peers' reports are theirs
    try:
        value = f"{exit_code} {message[:500]}"
        _watchdog.client.key_value_set(f"{_FAILED_KEY}{jax.process_index()}", value, allow_overwrite=True)
        time.sleep(2 * _watchdog.interval_s)  # the coordinator may live in this process's child: let them read it
    except Exception:
        pass
    _say_farewell()  # everyone has been told; the port is free for a rerun soon


def await_peer_verdict() -> None:
    """After a collective failed on this process: a peer probably died. Waits (at most the peer
    timeout) for the watchdog to name it and exit; returns if it does not."""
    if _watchdog is not None:
        time.sleep(_watchdog.timeout_s + 2 * _watchdog.interval_s)


def start_watchdog(peer_timeout_s: float) -> None:
    global _watchdog
    if _watchdog is None:
        _watchdog = _PeerWatchdog(peer_timeout_s)
        _watchdog.start()


class _PeerWatchdog(threading.Thread):
    """Heartbeats through jax's coordination service; ends the process when a peer goes silent."""

    def __init__(self, timeout_s: float):
        super().__init__(name="lmjax-peer-watchdog", daemon=True)
        from jax._src.distributed import global_state

        self.client = global_state.client
        self.coordinator = global_state.coordinator_address
        self.timeout_s = timeout_s
        self.me, self.n = jax.process_index(), jax.process_count()
        self.interval_s = min(5.0, timeout_s / 10)
        self.failing = False
        self._stopped = threading.Event()

    def stop(self) -> None:
        """At a normal end: no more heartbeats (the others stop watching at the same barrier)."""
        self._stopped.set()
        self.join(timeout=2 * self.interval_s)

    def run(self) -> None:
        beat, now = 0, time.monotonic()
        last_change = {p: now for p in range(self.n) if p != self.me}
        last_value: dict[int, str] = {}
        coordinator_ok = now
        while not self._stopped.is_set():
            beat += 1
            now = time.monotonic()
            try:
                self.client.key_value_set(f"{_HEARTBEAT_KEY}{self.me}", str(beat), allow_overwrite=True)
                values = dict(self.client.key_value_dir_get(_HEARTBEAT_KEY))
                failed = self.client.key_value_dir_get(_FAILED_KEY)
                coordinator_ok = now
            except Exception:  # the coordination service lives beside process 0, on its host
                if now - coordinator_ok > self.timeout_s:
                    self._lost(0, f"the coordinator at {self.coordinator} no longer answers")
                self._stopped.wait(self.interval_s)
                continue
            for key, message in failed:
                process = int(key.rsplit("/", 1)[-1])
                if process != self.me and not self.failing:
                    code, _, text = message.partition(" ")
                    self._exit(f"error: process {process} of {self.n} failed: {text}", int(code))
            for p in last_change:
                value = values.get(f"{_HEARTBEAT_KEY}{p}")
                if value != last_value.get(p):
                    last_value[p], last_change[p] = value, now
            silent = [p for p, t in last_change.items() if now - t > self.timeout_s]
            if silent:
                self._lost(silent[0], "no heartbeat")
            self._stopped.wait(self.interval_s)

    def _lost(self, process: int, why: str) -> None:
        # os._exit: the main thread may be blocked in a collective that will never complete, and a
        # normal exit would wait for it (and for jax's shutdown barrier).
        self._exit(f"error: process {process} of {self.n} stopped responding ({why} for {self.timeout_s:.0f} s, "
                   f"train.peer_timeout_s); process {self.me} on {socket.gethostname()} exits; "
                   "rerun the same command to resume from the last complete checkpoint")

    def _exit(self, message: str, code: int = EXIT_PEER_LOST) -> None:
        try:
            sys.stdout.flush()
        finally:
            os.write(2, (message + "\n").encode())
            os._exit(code)


if __name__ == "__main__":  # the coordination service's process (`_start_coordinator`)
    _serve_coordinator(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
