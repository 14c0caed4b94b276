"""The final evaluation a scaling fit reads: `train.final_eval_tokens` of the validation split, with its standard error."""

from __future__ import annotations

import json
import math

import pytest

from lmjax import cli
from lmjax.evaluate import evaluate_run


def test_final_eval_reads_the_asked_tokens_and_reports_its_standard_error(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    # 16 rows x 32 tokens = 512 tokens per batch: 1,500 tokens are ceil(1500 / 512) = 3 batches.
    assert cli.main(["train", "configs/dense_tiny.yaml", *tiny_overrides, f"run_dir={run}", "train.steps=3",
                     "train.final_eval_tokens=1500"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    # `lmjax eval` over the same 3 batches, by another path (the checkpoint reloaded): the same numbers.
    again = evaluate_run(run, batches=3)
    assert summary["final_eval_loss"] == pytest.approx(again["eval_loss"], rel=1e-6)
    assert summary["final_eval_loss_stderr"] == pytest.approx(again["eval_loss_stderr"], rel=1e-5)
    assert summary["final_eval_tokens"] == again["eval_tokens"]
    assert 0 < summary["final_eval_loss_stderr"] < 0.2 * summary["final_eval_loss"]
    # Periodic evals (train.eval_batches=1) are one batch: no standard error, fewer tokens.
    one = evaluate_run(run, batches=1)
    assert "eval_loss_stderr" not in one and one["eval_tokens"] < summary["final_eval_tokens"]


def test_final_eval_stops_at_the_whole_validation_split(tmp_path, tiny_overrides):
    from lmjax.config import load_config
    from lmjax.tasks import build_task

    run = tmp_path / "run"
    assert cli.main(["train", "configs/dense_tiny.yaml", *tiny_overrides, f"run_dir={run}", "train.steps=2",
                     "train.final_eval_tokens=100000000"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    cfg = load_config(run / "config.yaml", [f"data.tokenizer.path={run / 'tokenizer.model'}"])
    data = build_task(cfg).build_data(cfg)
    rows = data.layout.num_rows(data.validation, data.seq_len)
    whole = rows // cfg.data.global_batch_size  # every full batch of the split, none read twice
    assert whole == data.validation_batches() and 2 <= whole < math.ceil(1e8 / 512)
    assert summary["final_eval_tokens"] == evaluate_run(run, batches=whole)["eval_tokens"]
    assert summary["final_eval_tokens"] < evaluate_run(run, batches=whole + 1)["eval_tokens"]
