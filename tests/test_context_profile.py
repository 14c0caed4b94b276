"""experiments/chinchilla_cpu/width/seeds/context_profile.py: eval loss by in-document position,
checked against logits computed by another path (`lmjax.api.load_model`) and against `lmjax eval`."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from lmjax import cli
from lmjax.api import load_model
from lmjax.config import replace
from lmjax.data import build_data
from lmjax.evaluate import evaluate_run

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("context_profile", ROOT / "experiments/chinchilla_cpu/width/seeds/context_profile.py")
context_profile = importlib.util.module_from_spec(spec)
spec.loader.exec_module(context_profile)


def test_loss_by_position_matches_logits_and_eval(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    assert cli.main(["train", "configs/dense_tiny.yaml", *tiny_overrides, f"run_dir={run}", "train.steps=3",
                     "data.seq_len=128", "data.max_documents=120"]) == 0
    table = context_profile.profile(run, rows=32)  # two batches of 16 rows
    # By hand: the same rows through the model's logits, numpy's log-softmax, numpy's bucketing. The
    # api numbers positions from the row start, not from each document's: RoPE's scores depend on
    # position differences only, and attention stays inside a document, so the losses agree.
    model = load_model(run)
    data = build_data(replace(model.config, **{"data.tokenizer.path": str(run / "tokenizer.model"), "data.global_batch_size": 16}))
    sums, counts = {}, {}
    for batch in data.eval_batches(2):
        logits = np.asarray(model.logits(batch["tokens"], attention_mask=batch["segment_ids"]), np.float64)
        log_p = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
        nll = -np.take_along_axis(log_p, batch["targets"][..., None], -1)[..., 0]
        for (start, stop), name in zip(context_profile.BUCKETS, table["loss_by_position"]):
            inside = (batch["positions"] >= start) & (batch["positions"] < (stop or 10**9)) & (batch["loss_mask"] > 0)
            sums[name] = sums.get(name, 0.0) + nll[inside].sum()
            counts[name] = counts.get(name, 0) + inside.sum()
    for name, mean in table["loss_by_position"].items():
        assert table["tokens_by_position"][name] == counts[name]
        assert mean == (None if counts[name] == 0 else pytest.approx(sums[name] / counts[name], rel=1e-4))
    assert table["loss_by_position"]["64-127"] is not None and table["context_gain"] == pytest.approx(
        table["loss_by_position"]["16-31"] - table["loss_by_position"]["64-127"])
    # All positions together are the eval loss `lmjax eval` gives on the same two batches.
    again = evaluate_run(run, ["data.global_batch_size=16"], batches=2)
    assert table["loss"] == pytest.approx(again["eval_loss"], rel=1e-5)
    assert sum(table["tokens_by_position"].values()) == again["eval_tokens"]
