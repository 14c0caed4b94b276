"""Per-step wall, user and system seconds and minor page faults of the step `lmjax bench` runs: what
separates slow steps from fast ones when step times are bimodal.

    .venv/bin/python experiments/bench/step_rusage.py CONFIG [key=value ...] [--steps 25]

After 2 warm-up steps, prints one line: `wall/user/sys/faults` for each step (getrusage around the
step, the whole process), then the peak RSS.
"""

import argparse
import os
import resource
import sys
import time

from steps import lmjax_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--steps", type=int, default=25)
    args = p.parse_args()
    run, close = lmjax_step(args.config, ["logging.wandb=off", *args.overrides], __file__)
    for i in range(2):
        run(i)
    out = []
    for i in range(args.steps):
        before, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        run(i)
        after = resource.getrusage(resource.RUSAGE_SELF)
        out.append(f"{time.perf_counter() - t:.2f}/{after.ru_utime - before.ru_utime:.2f}/"
                   f"{after.ru_stime - before.ru_stime:.2f}/{after.ru_minflt - before.ru_minflt}")
    print(os.environ.get("GLIBC_TUNABLES", ""), "wall/user/sys/faults", *out,
          f"maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10} MiB", flush=True)
    close()


if __name__ == "__main__":
    sys.exit(main())
