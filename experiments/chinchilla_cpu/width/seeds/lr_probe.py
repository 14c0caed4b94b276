"""One run of the fourth design's plan (width/plan.json) trained again, seed 0, at other learning rates;
everything else is the plan's run. Each on its own core, all at once, as run_seeds.py runs its pairs;
a finished probe is not trained again. Prints name,lr,loss,loss_stderr (the rows of lr_probe.csv).

    .venv/bin/python experiments/chinchilla_cpu/width/seeds/lr_probe.py [--run NAME] [--lrs LR ...]

Default: the fit's largest residual (8e12, N=93,080: its seeds' mean 4.5% above the law at the power
law's rate 0.0075) at the 2e12 grid's best rate for its size (0.016) and between the two (0.0113).
"""

import argparse
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from run_seeds import core_shares, plan_entry, train, write_base_config  # this folder's, on sys.path as the script's

from lmjax.fileio import read_completed_summary

PROBE_DIR = Path("runs/lr_probe")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="C8e12_N93080", help="a run name of width/plan.json")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.016, 0.0113], help="learning rates to try")
    args = parser.parse_args()
    plan, entry = plan_entry(args.run)
    base = write_base_config(plan)
    shares = core_shares(min(len(args.lrs), len(os.sched_getaffinity(0))))

    def probe(lr: float) -> Path:
        share = shares.get()
        try:  # the rate after the entry's own optim.lr, so it wins
            return train(base, entry, PROBE_DIR / f"{args.run}_lr{lr:g}", [f"optim.lr={lr:g}", "seed=0"], share)
        finally:
            shares.put(share)

    with ThreadPoolExecutor(shares.qsize()) as pool:
        run_dirs = list(pool.map(probe, args.lrs))
    print("name,lr,loss,loss_stderr")
    for lr, run_dir in zip(args.lrs, run_dirs):
        summary = read_completed_summary(run_dir)
        print(f"{run_dir.name},{lr:g},{summary['final_eval_loss']},{summary['final_eval_loss_stderr']}")


if __name__ == "__main__":
    main()
