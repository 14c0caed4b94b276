"""How wide Approach 3's interval on a is for this study's design, as a function of the noise on
each point: the question behind the issue's goal (a's 95% interval narrower than 0.2).

    .venv/bin/python experiments/chinchilla_cpu/width/seeds/interval_vs_noise.py [--reps 3] [--bootstrap 200]

The design is the fourth study's fitted points (`width/runs.csv` after the best learning rate per
budget and size: 25 (N, D) pairs over 2e12-3.2e13). The truth is the law fitted to the study with
seeds (`seeds/fit.json`). For each noise level sigma, `--reps` synthetic studies draw each point's
loss as law(N, D) * exp(sigma * z), z standard normal, and are fitted exactly as the study is
(`fit_scaling_laws`, the same bootstrap). The real study's own scatter is read off as the root mean
square of log(loss / law) over its points. Prints the table and writes interval_vs_noise.json here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from lmjax.scaling.fit import ScalingLaw, fit_scaling_laws
from lmjax.scaling.runs import load_run_table

HERE = Path("experiments/chinchilla_cpu/width/seeds")  # run from the repository root
SIGMAS = (0.0025, 0.005, 0.01, 0.02, 0.04)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="synthetic studies per noise level")
    parser.add_argument("--bootstrap", type=int, default=200)
    args = parser.parse_args()
    law = ScalingLaw.from_fit(json.loads((HERE / "fit.json").read_text()))
    design = load_run_table(HERE.parent / "runs.csv", "total").runs
    seeded = load_run_table(HERE / "runs.csv", "total").runs
    scatter = float(np.sqrt(np.mean([np.log(r.loss / law.loss(r.params, r.tokens)) ** 2 for r in seeded])))
    rng = np.random.default_rng(0)
    rows = []
    for sigma in SIGMAS:
        widths, errors = [], []
        for _ in range(args.reps):
            runs = [dataclasses.replace(r, loss=float(law.loss(r.params, r.tokens) * np.exp(sigma * rng.normal())))
                    for r in design]
            a = fit_scaling_laws(runs, bootstrap=args.bootstrap).to_json()["approach3"]["a"]
            widths.append(a["ci_high"] - a["ci_low"])
            errors.append(abs(a["value"] - law.a))
        rows.append({"sigma": sigma, "a_interval_widths": widths, "median_width": float(np.median(widths)),
                     "a_abs_errors": errors})
        print(f"sigma {sigma:.4f}: a interval width {np.median(widths):.3f} (median of {args.reps}: "
              f"{', '.join(f'{w:.3f}' for w in widths)}); |a - true a| {', '.join(f'{e:.3f}' for e in errors)}",
              flush=True)
    print(f"the study's own scatter about its law: {scatter:.4f} (rms of log loss / law over {len(seeded)} points)")
    out = {"true_law": dataclasses.asdict(law), "true_a": law.a, "design_points": len(design),
           "study_scatter": scatter, "bootstrap": args.bootstrap, "rows": rows}
    (HERE / "interval_vs_noise.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
