"""How far a study's points lie from its fitted Approach 3 law: each point's log(loss / law) and their
root mean square, the number `width/seeds/interval_vs_noise.py` relates to the width of a's interval
(median widths 0.16 at 0.5%, 0.25 at 1%, 0.49 at 2% for the fourth design's points).

    .venv/bin/python experiments/chinchilla_cpu/law_scatter.py experiments/chinchilla_cpu/short

The folder holds a study's fit.json and runs.csv (as `lmjax sweep` and `lmjax fit` write them); the
points are the fit's own: the best learning rate per budget and size, seeds at their mean.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from lmjax.scaling.fit import ScalingLaw
from lmjax.scaling.runs import load_run_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path, help="a folder with fit.json and runs.csv")
    args = parser.parse_args()
    if not (args.study / "fit.json").is_file() or not (args.study / "runs.csv").is_file():
        sys.exit(f"{args.study}: expected a study folder with fit.json and runs.csv")
    fit = json.loads((args.study / "fit.json").read_text())
    law = ScalingLaw.from_fit(fit)
    runs = load_run_table(args.study / "runs.csv", fit["param_convention"]).runs
    print("budget,params,tokens,loss,log_loss_over_law")
    residuals = []
    for run in sorted(runs, key=lambda r: (r.budget, r.params)):
        residuals.append(float(np.log(run.loss / law.loss(run.params, run.tokens))))
        print(f"{run.budget:g},{run.params:.0f},{run.tokens:.0f},{run.loss:.4f},{residuals[-1]:+.4f}")
    print(f"rms of log(loss / law) over {len(runs)} points: {np.sqrt(np.mean(np.square(residuals))):.4f}")


if __name__ == "__main__":
    main()
