"""Where a setting's run-to-run spread comes from: one run of the fourth design's plan
(width/plan.json) trained with the initialisation of one seed and the data order of another
(`seed=I data.seed=D`); everything else is the plan's run. The plan's own seed runs are the
diagonal (I = D). Each run on its own core, two at a time as run_seeds.py runs its pairs; a
finished run is not trained again. Writes seed_split.csv in this folder: every finished run under
runs/seed_split (name,run,init_seed,data_seed,changes,loss,loss_stderr), these and earlier ones.

    .venv/bin/python experiments/chinchilla_cpu/width/seeds/seed_split.py [--run NAME] [--pairs I:D ...]
        [--parallel N] [--changes KEY=VALUE ...]

Default: 1.6e13, N=295,600, whose seeds 0 / 1 / 2 end at 2.775 / 2.930 / 2.726: seed 1's init with
seed 2's data and the reverse. `--changes` adds overrides to every run (a remedy to test on the
same pairs); they are part of the run's name.
"""

import argparse
import csv
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from run_seeds import HERE, core_shares, plan_entry, train, write_base_config  # this folder's, on sys.path as the script's

from lmjax.fileio import read_completed_summary

SPLIT_DIR = Path("runs/seed_split")


def parse_pair(text: str) -> tuple[int, int]:
    init, sep, data = text.partition(":")
    if not (sep and init.isdigit() and data.isdigit()):
        raise argparse.ArgumentTypeError(f"expected INIT:DATA seeds such as 1:2, got {text!r}")
    return int(init), int(data)


def run_name(run: str, init: int, data: int, changes: list[str]) -> str:
    suffix = "".join(f"_{c.replace('=', '')}" for c in changes)
    return f"{run}_i{init}_d{data}{suffix}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="C1.6e13_N295600", help="a run name of width/plan.json")
    parser.add_argument("--pairs", type=parse_pair, nargs="+", default=[(1, 2), (2, 1)],
                        help="INIT:DATA seed pairs to train")
    parser.add_argument("--parallel", type=int, default=2, help="runs at once, one core each")
    parser.add_argument("--changes", nargs="*", default=[], help="overrides added to every run")
    args = parser.parse_args()
    plan, entry = plan_entry(args.run)
    base = write_base_config(plan)
    shares = core_shares(args.parallel)

    def split(pair: tuple[int, int]) -> Path:
        init, data = pair
        share = shares.get()
        run_dir = SPLIT_DIR / run_name(args.run, init, data, args.changes)
        run_dir.mkdir(parents=True, exist_ok=True)  # what the run is, for the table
        (run_dir / "split.json").write_text(json.dumps(
            {"run": args.run, "init_seed": init, "data_seed": data, "changes": " ".join(args.changes)}))
        try:  # after the entry's own overrides, so these win
            return train(base, entry, run_dir, [f"seed={init}", f"data.seed={data}", *args.changes], share)
        finally:
            shares.put(share)

    with ThreadPoolExecutor(args.parallel) as pool:
        list(pool.map(split, args.pairs))
    write_table(HERE / "seed_split.csv")


def write_table(path: Path) -> None:
    """Every finished run under SPLIT_DIR, with the seeds and changes its split.json records."""
    rows = []
    for run_dir in sorted(p for p in SPLIT_DIR.iterdir() if p.is_dir()):
        summary = read_completed_summary(run_dir)
        if summary is None:
            continue
        entry = json.loads((run_dir / "split.json").read_text())
        rows.append({"name": run_dir.name, **entry, "loss": summary["final_eval_loss"],
                     "loss_stderr": summary["final_eval_loss_stderr"]})
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, ["name", "run", "init_seed", "data_seed", "changes", "loss", "loss_stderr"])
        writer.writeheader()
        writer.writerows(rows)
    for row in rows:
        print(f"{row['name']}: {row['loss']:.4f}")


if __name__ == "__main__":
    main()
