"""Loss and MLM accuracy curves of a masked-LM run, against the unigram-frequency baseline.

    python experiments/mlm_cpu/plot.py runs/bert_tiny experiments/mlm_cpu/curves.png
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(run_dir: str, out: str) -> None:
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss (masked tokens)")
    left.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    left.axhline(0.75 * math.log(2048), color="grey", ls="--", label="0.75 ln(vocab)")
    left.set_xlabel("step")
    left.set_ylabel("cross-entropy (nats)")
    left.legend()
    right.plot([r["step"] for r in train], [r["mlm_accuracy"] for r in train], label="train MLM accuracy")
    right.plot([r["step"] for r in evals], [r["eval_mlm_accuracy"] for r in evals], "o-", label="eval MLM accuracy")
    right.plot([r["step"] for r in evals], [r["eval_unigram_accuracy"] for r in evals], "s--", color="grey",
               label="unigram-frequency baseline")
    right.set_xlabel("step")
    right.set_ylabel("accuracy on masked tokens")
    right.legend()
    fig.suptitle(f"{Path(run_dir).name}: masked LM on the built-in corpus")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
