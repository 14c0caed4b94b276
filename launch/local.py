#!/usr/bin/env python3
"""N lmjax processes on this machine, as one multi-process (multi-host) run: the way to run and
test the multi-host path without a cluster.

    python launch/local.py --processes 2 --devices-per-process 4 -- train configs/dense_tiny.yaml run_dir=runs/mp
    python launch/local.py --processes 2 --dry-run -- train configs/dense_tiny.yaml

Each process is `<this python> -m lmjax.cli ARGS...` with LMJAX_COORDINATOR (127.0.0.1:PORT),
LMJAX_NUM_PROCESSES and LMJAX_PROCESS_ID set (lmjax/distributed.py reads them). On CPU every
process gets `--devices-per-process` fake devices (XLA's host platform device count) and gloo
collectives; with `--platform gpu` each gets its own GPUs through CUDA_VISIBLE_DEVICES.

SIGTERM/SIGINT to the launcher go to every process (each saves the same step and exits 128+signal);
a signal to one process alone reaches the others through the train step. The launcher exits with
the first non-zero exit status of its processes (0 when all succeeded).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_environments(processes: int, devices_per_process: int, platform: str, port: int) -> list[dict[str, str]]:
    """The variables each process gets on top of this environment."""
    envs = []
    for i in range(processes):
        env = {"LMJAX_COORDINATOR": f"127.0.0.1:{port}", "LMJAX_NUM_PROCESSES": str(processes), "LMJAX_PROCESS_ID": str(i)}
        if platform == "cpu":
            flags = os.environ.get("XLA_FLAGS", "")
            flags = " ".join(f for f in flags.split() if not f.startswith("--xla_force_host_platform_device_count"))
            env |= {"JAX_PLATFORMS": "cpu",
                    "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices_per_process}".strip()}
        else:
            first = i * devices_per_process
            env |= {"CUDA_VISIBLE_DEVICES": ",".join(str(d) for d in range(first, first + devices_per_process))}
        envs.append(env)
    return envs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices-per-process", type=int, default=4)
    parser.add_argument("--platform", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--port", type=int, default=0, help="the coordinator's port (default: a free one)")
    parser.add_argument("--log-dir", help="write process i's output to LOG_DIR/process_<i>.log instead of this terminal")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("lmjax_args", nargs=argparse.REMAINDER, help="-- then the lmjax command, e.g. -- train CONFIG k=v")
    args = parser.parse_args(argv)
    command_args = args.lmjax_args[1:] if args.lmjax_args[:1] == ["--"] else args.lmjax_args
    if not command_args:
        parser.error("expected the lmjax command after --, e.g. -- train configs/dense_tiny.yaml")
    if args.processes < 1 or args.devices_per_process < 1:
        parser.error(f"expected --processes >= 1 and --devices-per-process >= 1, got {args.processes} and {args.devices_per_process}")
    port = args.port or _free_port()
    command = [sys.executable, "-m", "lmjax.cli", *command_args]
    envs = process_environments(args.processes, args.devices_per_process, args.platform, port)
    if args.dry_run:
        for env in envs:
            print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(command))
        return 0

    children = []
    for i, env in enumerate(envs):
        out = None
        if args.log_dir:
            Path(args.log_dir).mkdir(parents=True, exist_ok=True)
            out = open(Path(args.log_dir) / f"process_{i}.log", "w")
        children.append(subprocess.Popen(command, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT if out else None))

    def forward(signum, frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    codes = [child.wait() for child in children]
    return next((code for code in codes if code != 0), 0)


if __name__ == "__main__":
    sys.exit(main())
