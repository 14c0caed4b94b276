"""Reads runs/mup_transfer/*/summary.json (or the committed results/runs.csv) and draws loss against
learning rate per width, SP and μP side by side: experiments/mup_transfer/loss_vs_lr.png.

Run from the repo root after run.py: `.venv/bin/python experiments/mup_transfer/plot.py`.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import LRS, RUNS, WIDTHS, run_name  # noqa: E402

RESULTS = HERE / "results" / "runs.csv"
COLUMNS = ("parameterization", "width", "lr", "final_eval_loss", "final_eval_loss_stderr", "status")


def collect() -> list[dict]:
    """From the run directories when present, else the committed table."""
    if not RUNS.exists():
        with RESULTS.open() as handle:
            return [{**row, "width": int(row["width"]), "lr": float(row["lr"]),
                     "final_eval_loss": float(row["final_eval_loss"] or "nan"),
                     "final_eval_loss_stderr": float(row["final_eval_loss_stderr"] or "nan")}
                    for row in csv.DictReader(handle)]
    rows = []
    for width in WIDTHS:
        for parameterization in ("sp", "mup"):
            for lr in LRS:
                path = RUNS / run_name(parameterization, width, lr) / "summary.json"
                summary = json.loads(path.read_text()) if path.exists() else {}
                status = summary.get("status", "diverged or not run" if (path.parent / "config.yaml").exists() else "not run")
                rows.append({"parameterization": parameterization, "width": width, "lr": lr,
                             "final_eval_loss": summary.get("final_eval_loss", math.nan),
                             "final_eval_loss_stderr": summary.get("final_eval_loss_stderr", math.nan),
                             "status": status})
    RESULTS.parent.mkdir(exist_ok=True)
    with RESULTS.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def best_lrs(rows: list[dict]) -> dict[tuple[str, int], tuple[float, float]]:
    """(parameterization, width) -> (best lr, its loss) among the finished runs."""
    best = {}
    for row in rows:
        key, loss = (row["parameterization"], row["width"]), row["final_eval_loss"]
        if math.isfinite(loss) and (key not in best or loss < best[key][1]):
            best[key] = (row["lr"], loss)
    return best


def main() -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = collect()
    best = best_lrs(rows)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colors = plt.cm.viridis([i / (len(WIDTHS) - 1) for i in range(len(WIDTHS))])
    for ax, parameterization, title in zip(axes, ("sp", "mup"), ("SP (standard)", "μP (base width 32)")):
        for width, color in zip(WIDTHS, colors):
            points = sorted((r["lr"], r["final_eval_loss"]) for r in rows
                            if r["parameterization"] == parameterization and r["width"] == width
                            and math.isfinite(r["final_eval_loss"]))
            if not points:
                continue
            ax.plot(*zip(*points), "o-", color=color, label=f"width {width}")
            if (parameterization, width) in best:
                ax.plot(*best[(parameterization, width)], "*", color=color, markersize=16, markeredgecolor="k")
        ax.set(xscale="log", xlabel="learning rate (Adam, peak)", title=title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("final eval loss (whole validation split)")
    axes[1].legend(fontsize=8)
    finite = [r["final_eval_loss"] for r in rows if math.isfinite(r["final_eval_loss"])]
    if finite:
        axes[0].set_ylim(min(finite) - 0.05, max(finite) + 0.05)
    figure.suptitle("Loss against learning rate as width grows 8x (stars: best per width)")
    figure.tight_layout()
    figure.savefig(HERE / "loss_vs_lr.png", dpi=120)
    print("| width | SP best lr | SP loss | μP best lr | μP loss |\n|---|---|---|---|---|")
    for width in WIDTHS:
        cells = []
        for p in ("sp", "mup"):
            lr, loss = best.get((p, width), (math.nan, math.nan))
            cells += [f"{lr:g}", f"{loss:.4f}"]
        print(f"| {width} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
