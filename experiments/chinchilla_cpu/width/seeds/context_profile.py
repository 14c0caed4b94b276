"""Eval loss by a token's position in its document, for finished causal-LM runs: does the model use
its context (copying from earlier in the document, the induction-head ability), or only the last
few tokens? Prints one line per run and writes the table as JSON.

    .venv/bin/python experiments/chinchilla_cpu/width/seeds/context_profile.py RUN_DIR... [--rows 1000]
        [--out FILE.json]

Each run is read at its latest checkpoint, with its own tokenizer, on the first `--rows` rows
(seq_len tokens each, rounded up to whole batches of 16) of its validation split, in the order
the final eval reads them (`--rows 7813` at seq_len 128: the 1M tokens of the sweeps' final eval). Positions
restart at each document start and at each row start (`lmjax.data.pipeline`), so position p means
p tokens of the same document are visible. `context_gain` is the mean loss at positions 16-31
minus that at 64-127: how much a run gains from a long context over a short one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import numpy as np

from lmjax import sharding
from lmjax.evaluate import load_run, reader_overrides, run_data

BUCKETS = ((0, 4), (4, 16), (16, 32), (32, 64), (64, 128), (128, None))
BATCH_ROWS = 16


def profile(run_dir: Path, rows: int) -> dict:
    """Mean eval loss per position bucket of `run_dir`'s latest checkpoint, and the run's context gain."""
    overrides = [*reader_overrides(jax.device_count()), f"data.global_batch_size={BATCH_ROWS}"]
    run = load_run(run_dir, overrides)
    setup, task = run.setup, run.setup.task
    if not hasattr(task, "token_losses"):
        raise SystemExit(f"{run_dir}: train.objective={run.cfg.train.objective} has no next-token losses to profile")
    data = run_data(run, run_dir)
    token_losses = jax.jit(lambda params, batch: task.token_losses(params, batch, setup.model)[0])
    sums, counts = np.zeros(len(BUCKETS)), np.zeros(len(BUCKETS))
    edges = np.array([start for start, _ in BUCKETS[1:]])
    with sharding.activate(setup.mesh, setup.rules):
        for host_batch in data.eval_batches(-(-rows // BATCH_ROWS), jax.process_index(), jax.process_count()):
            ce_BL = np.asarray(token_losses(run.params, setup.global_batch(host_batch)))
            weight_BL = np.asarray(host_batch["loss_mask"])
            bucket_BL = np.searchsorted(edges, host_batch["positions"], side="right")
            np.add.at(sums, bucket_BL, ce_BL * weight_BL)
            np.add.at(counts, bucket_BL, weight_BL)
    means = {f"{a}-{'' if b is None else b - 1}": (float(s / c) if c else None)
             for (a, b), s, c in zip(BUCKETS, sums, counts)}
    gain = None if means["16-31"] is None or means["64-127"] is None else means["16-31"] - means["64-127"]
    return {"run": str(run_dir), "step": run.step, "rows": rows, "loss": float(sums.sum() / counts.sum()),
            "loss_by_position": means, "tokens_by_position": dict(zip(means, counts.tolist())), "context_gain": gain}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (causal LM)")
    parser.add_argument("--rows", type=int, default=1000, help="validation rows read per run")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the table")
    args = parser.parse_args()
    if args.rows < 1:
        parser.error(f"--rows must be >= 1, got {args.rows}")
    table = []
    for run_dir in args.runs:
        row = profile(run_dir, args.rows)
        table.append(row)
        cells = " ".join(f"{k}:{v:.3f}" for k, v in row["loss_by_position"].items() if v is not None)
        gain = "n/a (rows under 128 tokens)" if row["context_gain"] is None else f"{row['context_gain']:.3f}"
        print(f"{run_dir.name}  {cells}  all:{row['loss']:.3f}  context_gain:{gain}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    main()
