"""Train on every worker of a TPU VM pod slice: `gcloud compute tpus tpu-vm ssh --worker=all`.

  python launch/tpu_pod.py --name NAME --zone ZONE CONFIG [overrides] [--dry-run]
  python launch/tpu_pod.py --name NAME --zone ZONE --queued --accelerator-type v5litepod-16 \\
      --runtime-version v2-alpha-tpuv5-lite [--spot] CONFIG [overrides] [--dry-run]

Every worker runs `cd WORKDIR && PYTHON -m lmjax.cli train CONFIG [overrides]`; jax.distributed
finds the other workers from the TPU metadata (lmjax/distributed.py). WORKDIR and PYTHON default to
this directory and this interpreter: run it from worker 0 of the slice, or give the paths the
workers hold the repository and its environment at (the same on every worker). run_dir must be on
storage every worker sees (checkpoints are written by all of them). With --queued, a queued resource
asks for the slice first and the launcher waits until it is ACTIVE. --dry-run prints the gcloud
commands instead of running them.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time

from lmjax.cli import parse_with_overrides
from lmjax.errors import UserError

POLL_SECONDS = 30


def gcloud(args: argparse.Namespace, *words: str) -> list[str]:
    project = [f"--project={args.project}"] if args.project else []
    return ["gcloud", "compute", "tpus", *words, f"--zone={args.zone}", *project]


def commands(args: argparse.Namespace) -> dict[str, list[str]]:
    """{"create", "state", "train"} (the first two only with --queued)."""
    if args.queued and not (args.accelerator_type and args.runtime_version):
        raise UserError("--queued needs --accelerator-type (e.g. v5litepod-16) and --runtime-version "
                        "(e.g. v2-alpha-tpuv5-lite)")
    if not args.queued and (args.accelerator_type or args.runtime_version or args.spot):
        raise UserError("--accelerator-type, --runtime-version and --spot create a queued resource: add --queued")
    remote = f"cd {shlex.quote(args.workdir)} && {shlex.join([args.python, '-m', 'lmjax.cli', 'train', args.config, *args.overrides])}"
    found = {"train": gcloud(args, "tpu-vm", "ssh", args.name) + ["--worker=all", "--command", remote]}
    if args.queued:
        found["create"] = gcloud(args, "queued-resources", "create", args.name) + [
            f"--node-id={args.name}", f"--accelerator-type={args.accelerator_type}",
            f"--runtime-version={args.runtime_version}", *(["--spot"] if args.spot else [])]
        found["state"] = gcloud(args, "queued-resources", "describe", args.name) + ["--format", "value(state.state)"]
    return found


def wait_until_active(state_command: list[str]) -> None:
    while True:
        state = subprocess.run(state_command, capture_output=True, text=True, check=True).stdout.strip()
        if state == "ACTIVE":
            return
        if state in ("FAILED", "SUSPENDED"):
            raise UserError(f"the queued resource is {state}: {shlex.join(state_command[:-1])} says why")
        print(f"queued resource: {state or 'no state yet'}; next look in {POLL_SECONDS} s", flush=True)
        time.sleep(POLL_SECONDS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launch/tpu_pod.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides")
    parser.add_argument("--name", required=True, help="the TPU VM (and queued resource) name")
    parser.add_argument("--zone", required=True)
    parser.add_argument("--project", default=None, help="default: gcloud's configured project")
    parser.add_argument("--workdir", default=os.getcwd(), help="the repository on the workers (default: this directory)")
    parser.add_argument("--python", default=os.path.abspath(sys.executable),
                        help="the interpreter on the workers (default: this one)")
    parser.add_argument("--queued", action="store_true", help="create a queued resource and wait until it is ACTIVE")
    parser.add_argument("--accelerator-type", default=None)
    parser.add_argument("--runtime-version", default=None)
    parser.add_argument("--spot", action="store_true", help="a preemptible (spot) slice")
    parser.add_argument("--dry-run", action="store_true", help="print the gcloud commands instead of running them")
    args = parse_with_overrides(parser, argv)
    try:
        found = commands(args)
        if args.dry_run:
            if args.queued:
                print(shlex.join(found["create"]))
                print(f"{shlex.join(found['state'])}  # every {POLL_SECONDS} s until it prints ACTIVE")
            print(shlex.join(found["train"]))
            return 0
        if shutil.which("gcloud") is None:
            raise UserError("gcloud is not on PATH: install the Google Cloud CLI (or use --dry-run)")
        if args.queued:
            subprocess.run(found["create"], check=True)
            wait_until_active(found["state"])
        return subprocess.run(found["train"]).returncode
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as err:
        print(f"error: {shlex.join(err.cmd)} failed with exit code {err.returncode}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
