"""How much the decoder reads the encoder: eval loss of a T5 run with each row's own encoder input,
and with the encoder input of another row of the batch (rolled by one), on the run's eval batches.

    python experiments/t5_cpu/encoder_ablation.py runs/t5_tiny [runs/t5_seq2seq_finetuned ...]

Prints one JSON line per run: eval_loss (own input), eval_loss_other_input, and their difference
in nats per target token (0 = the decoder ignores the encoder).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np

from lmjax.evaluate import evaluate, eval_constants, load_run, run_data
from lmjax.tasks.seq2seq import ENCODER_KEYS


def ablation(run_dir: Path) -> dict:
    run = load_run(run_dir, [f"mesh.{axis}=1" for axis in ("data", "fsdp", "tensor", "expert")], devices=jax.devices()[:1])
    setup = run.setup
    data = run_data(run, run_dir)
    batches = data.eval_batches(run.cfg.train.eval_batches)
    other = [{k: np.roll(v, 1, axis=0) if k in ENCODER_KEYS else v for k, v in b.items()} for b in batches]
    constants, step = eval_constants(setup, data), setup.eval_step()

    def loss(host_batches):
        return evaluate(step, setup.task, run.params, run.frozen, [setup.global_batch(b) for b in host_batches], constants)["eval_loss"]

    own, shuffled = loss(batches), loss(other)
    return {"run": str(run_dir), "step": run.step, "eval_loss": own, "eval_loss_other_input": shuffled, "encoder_nats": shuffled - own}


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(json.dumps(ablation(Path(path))))
