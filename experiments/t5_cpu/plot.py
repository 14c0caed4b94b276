"""Curves of the T5 study: span-corruption pretraining, then docstring -> body fine-tuned against
from scratch.

    python experiments/t5_cpu/plot.py runs/t5_tiny runs/t5_seq2seq_finetuned runs/t5_seq2seq_scratch experiments/t5_cpu
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def records(run_dir: str) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]


def plot_pretraining(run_dir: str, out: Path) -> None:
    train, evals = records(run_dir)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss (target tokens)")
    left.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    left.axhline(0.75 * math.log(2048), color="grey", ls="--", label="0.75 ln(vocab)")
    left.set_xlabel("step")
    left.set_ylabel("cross-entropy (nats)")
    left.legend()
    right.plot([r["step"] for r in train], [r["token_accuracy"] for r in train], label="train")
    right.plot([r["step"] for r in evals], [r["eval_token_accuracy"] for r in evals], "o-", label="eval")
    right.set_xlabel("step")
    right.set_ylabel("next-token accuracy on the targets")
    right.legend()
    fig.suptitle(f"{Path(run_dir).name}: span corruption on the built-in corpus")
    fig.tight_layout()
    fig.savefig(out / "pretraining.png", dpi=110)


def plot_finetuning(finetuned: str, scratch: str, out: Path, scratch_evals: str | None = None) -> None:
    """`scratch_evals`: `lmjax eval --step` lines that replace the scratch run's logged evaluations
    (that run logged them with an earlier evaluation, see the README)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for run_dir, label in ((finetuned, "from the span-corruption run"), (scratch, "from scratch")):
        train, evals = records(run_dir)
        if run_dir == scratch and scratch_evals:
            evals = [json.loads(line) for line in Path(scratch_evals).read_text().splitlines()]
        line, = left.plot([r["step"] for r in train], [r["loss"] for r in train], alpha=0.5, label=f"train, {label}")
        left.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", color=line.get_color(), label=f"held-out files, {label}")
        right.plot([r["step"] for r in evals], [r["eval_token_accuracy"] for r in evals], "o-", color=line.get_color(), label=label)
    left.set_xlabel("step")
    left.set_ylabel("cross-entropy of the body (nats)")
    left.legend()
    right.set_xlabel("step")
    right.set_ylabel("token accuracy of the body, held-out files")
    right.legend()
    fig.suptitle("docstring -> body, t5_tiny")
    fig.tight_layout()
    fig.savefig(out / "finetuning.png", dpi=110)


if __name__ == "__main__":
    pretrained, finetuned, scratch, out = sys.argv[1:5]
    plot_pretraining(pretrained, Path(out))
    plot_finetuning(finetuned, scratch, Path(out), *sys.argv[5:6])
