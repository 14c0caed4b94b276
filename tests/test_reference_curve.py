"""The trainer refactor changed no number: a short `dense_tiny` run reproduces the loss curve
recorded with the trainer as it was before tasks existed (commit d3cf911), bit for bit until the
norm gains' gradients became matrix-vector products (`lmjax/models/feature_params.py`, the same sum
in another float32 order): since then the gradient norm differs from the 6th digit (at most 8e-6
relative over the 12 steps), the final loss in the 8th, so the curve is compared to 1e-5.

The reference was written by this test with LMJAX_WRITE_REFERENCE=1 on the pre-refactor code, on
a 2-core x86-64 CPU with the test suite's XLA flags (8 fake devices, Eigen matmuls). XLA:CPU
results depend on the matmul kernels the CPU selects, so on another CPU model the comparison may
differ in the last bits. Exact resume is tested on its own (tests/test_resume.py).

The tokenizer's reserved pieces are pinned to the ones of that time: the chat role markers added to
the defaults since (issue 11) change the vocabulary, and so the curve, without touching the trainer.
"""

import json
import os
from pathlib import Path

import numpy as np

from lmjax.config import load_config
from lmjax.train.loop import train

REFERENCE = Path(__file__).parent / "data" / "dense_tiny_curve.json"
ROOT = Path(__file__).parent.parent


def _curve(tmp_path: Path, data_cache: Path) -> dict:
    overrides = [
        f"run_dir={tmp_path / 'run'}",
        f"data.cache_dir={data_cache}",
        "data.max_documents=120",
        "train.steps=12",
        "train.log_every=1",
        "train.eval_every=6",
        "train.checkpoint_every=6",
        "logging.wandb=off",
        "logging.progress=false",
        "data.tokenizer.special_tokens=[<mask>,<sep>,<cls>]",
    ]
    train(load_config(ROOT / "configs" / "dense_tiny.yaml", overrides))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return {
        "train": [[r["step"], r["loss"], r["grad_norm"], r["param_norm"]] for r in records if "loss" in r],
        "eval": [[r["step"], r["eval_loss"], r["eval_bpb"]] for r in records if "eval_loss" in r],
    }


def test_dense_tiny_curve_matches_the_pre_refactor_trainer(tmp_path, data_cache):
    curve = _curve(tmp_path, data_cache)
    if os.environ.get("LMJAX_WRITE_REFERENCE") == "1":
        REFERENCE.write_text(json.dumps(curve, indent=1) + "\n")
    reference = json.loads(REFERENCE.read_text())
    assert len(curve["train"]) == 12 and len(curve["eval"]) == 2
    for key in ("train", "eval"):
        assert [row[0] for row in curve[key]] == [row[0] for row in reference[key]]  # the same steps
        np.testing.assert_allclose(np.array(curve[key])[:, 1:], np.array(reference[key])[:, 1:], rtol=1e-5, atol=0)
