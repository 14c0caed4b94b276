"""Reward against KL to the reference, one line per beta (the DPO paper's frontier), and a table.

    .venv/bin/python experiments/dpo_python_syntax/plot.py results/evals.jsonl results/

Reads the lines evaluate.py wrote; every DPO line starts from the SFT run (KL 0). Writes
frontier.png and prints a markdown table of every evaluated checkpoint.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(evals_path: str, out_dir: str) -> None:
    rows = [json.loads(line) for line in Path(evals_path).read_text().splitlines()]
    sft = next(r for r in rows if r["objective"] == "sft")
    betas = sorted({r["beta"] for r in rows if r["objective"] == "dpo"})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "parse", "fraction of samples that parse"), (axes[1], "reward", "mean python_syntax reward")):
        for beta in betas:
            points = sorted((r for r in rows if r["objective"] == "dpo" and r["beta"] == beta), key=lambda r: r["step"])
            xs, ys = [0.0] + [r["kl"] for r in points], [sft[key]] + [r[key] for r in points]
            ax.plot(xs, ys, marker="o", label=f"DPO beta={beta}")
            for r in points:
                ax.annotate(str(r["step"]), (r["kl"], r[key]), textcoords="offset points", xytext=(4, -10), fontsize=7)
            if key == "parse":
                low, high = zip(*[r["parse_bootstrap95"] for r in points])
                ax.errorbar([r["kl"] for r in points], [r[key] for r in points],
                            yerr=[[r[key] - lo for r, lo in zip(points, low)], [hi - r[key] for r, hi in zip(points, high)]],
                            fmt="none", ecolor="gray", alpha=0.5, capsize=2)
        ax.axhline(sft[key], color="black", lw=0.8, ls=":", label="SFT (reference)")
        ax.set_xlabel("KL(policy || SFT) on policy samples, nats per completion")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(f"Held-out prompts: {sft['prompts']} x {sft['samples'] // sft['prompts']} samples at temperature 1")
    fig.tight_layout()
    fig.savefig(Path(out_dir) / "frontier.png", dpi=120)
    print("| run | step | beta | parse (95% bootstrap over prompts) | reward | KL to SFT (nats) | stopped | tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        low, high = r["parse_bootstrap95"]
        kl = f"{r['kl']:.2f} ± {r['kl_stderr']:.2f}" if "kl" in r else "n/a"
        print(f"| {Path(r['run']).name} | {r['step']} | {r['beta'] if r['beta'] is not None else ''} | "
              f"{r['parse']:.3f} [{low:.3f}, {high:.3f}] | {r['reward']:.3f} | {kl} | {r['stopped']:.2f} | {r['completion_tokens']:.0f} |")


if __name__ == "__main__":
    main(*sys.argv[1:3])
