"""The trainer end to end: sharded vs unsharded, exact resume, memorisation, non-finite stop."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lmjax import cli, sharding
from lmjax.config import load_config, replace
from lmjax.evaluate import load_run
from lmjax.train.loop import seconds_since_process_start, train
from lmjax.train.step import ModelSetup


def test_seconds_since_process_start_counts_from_the_process_start():
    code = "import time; time.sleep(1.5); from lmjax.train.loop import seconds_since_process_start as s; print(s())"
    age = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 1.5 <= age < 60  # the sleep, plus the imports of a fresh interpreter


def read_losses(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def test_sharded_equals_unsharded(tmp_path, tiny_overrides):
    one = load_config(None, tiny_overrides + [f"run_dir={tmp_path / 'one'}", "mesh.data=1"])
    train(one, devices=jax.devices()[:1])
    eight = load_config(None, tiny_overrides + [f"run_dir={tmp_path / 'eight'}", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    summary = train(eight)
    assert summary["devices"] == 8
    for key in ("final_eval_loss", "final_eval_bpb", "params_total", "params_non_embedding", "tokens", "train_flops",
                "wall_time_s", "corpus_fingerprint", "lmjax_version", "jax_version"):
        assert key in summary, key
    assert summary["tokens"] == 6 * 16 * 32 and summary["train_flops"] == summary["flops_per_token"] * summary["tokens"]
    assert 0 < summary["time_to_first_step_s"] < seconds_since_process_start()  # counted from this process's start
    records = [json.loads(line) for line in (tmp_path / "eight" / "metrics.jsonl").read_text().splitlines()]
    for key in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_sec", "tflops_per_sec", "mfu"):
        assert all(key in r for r in records if "loss" in r), key
    assert any("eval_loss" in r and "eval_bpb" in r for r in records)
    losses_one, losses_eight = read_losses(tmp_path / "one"), read_losses(tmp_path / "eight")
    assert sorted(losses_one)[:5] == [1, 2, 3, 4, 5]
    for step in range(1, 6):
        np.testing.assert_allclose(losses_eight[step], losses_one[step], rtol=1e-4)
    # The losses must move, or the comparison says nothing about the update being sharded right.
    assert losses_one[5] < losses_one[1] - 0.05


def test_params_are_created_sharded(tiny_overrides, tmp_path):
    cfg = load_config(None, tiny_overrides + [f"run_dir={tmp_path}", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    state = ModelSetup.build(cfg).factory.create(0)
    # The partition of every parameter, written out from the default rules (embed -> fsdp,
    # heads/kv_heads/mlp/vocab -> tensor, layers and head_dim unsharded): scanned layers lead.
    expected = {
        "embed/embedding": P("tensor", "fsdp"),  # [vocab, embed]
        "layers/attention/query/kernel": P(None, "fsdp", "tensor", None),  # [layers, embed, heads, head_dim]
        "layers/attention/key/kernel": P(None, "fsdp", "tensor", None),
        "layers/attention/value/kernel": P(None, "fsdp", "tensor", None),
        "layers/attention/out/kernel": P(None, "tensor", None, "fsdp"),  # [layers, heads, head_dim, embed]
        "layers/mlp/gate/kernel": P(None, "fsdp", "tensor"),  # [layers, embed, mlp]
        "layers/mlp/up/kernel": P(None, "fsdp", "tensor"),
        "layers/mlp/down/kernel": P(None, "tensor", "fsdp"),  # [layers, mlp, embed]
        "layers/attention_norm/scale": P(None, "fsdp"),
        "layers/mlp_norm/scale": P(None, "fsdp"),
        "final_norm/scale": P("fsdp"),
    }
    got = {"/".join(k.key for k in path): x.sharding.spec for path, x in jax.tree_util.tree_leaves_with_path(state.params)}
    assert set(got) == set(expected)
    for name, spec in expected.items():
        assert tuple(got[name]) + (None,) * (len(spec) - len(got[name])) == tuple(spec), name
    # The optimizer moments take their parameter's partition.
    for path, x in jax.tree_util.tree_leaves_with_path(state.opt_state):
        name = "/".join(getattr(k, "key", "") for k in path if hasattr(k, "key"))
        if name in expected and x.ndim:
            assert tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec)) == tuple(expected[name]), name


def _cli_command(config_overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "lmjax.cli", "train", "configs/dense_tiny.yaml", *config_overrides]


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training ended (rc={proc.returncode}) before the interruption point:\n{proc.stderr.read()}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the interruption point")
        time.sleep(0.005)


def _logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    return json.loads(lines[-1])["step"] if lines else 0


def _final_params(run_dir: Path) -> list[np.ndarray]:
    run = load_run(run_dir)
    return [np.asarray(x) for x in jax.tree.leaves(run.params)]


@pytest.fixture(scope="module")
def resume_setup(tmp_path_factory, tiny_overrides):
    """An uninterrupted reference run, and the overrides every resume test shares."""
    root = tmp_path_factory.mktemp("resume")
    overrides = tiny_overrides + ["train.steps=120", "train.checkpoint_every=20", "train.eval_every=60"]
    reference = root / "reference"
    assert cli.main(["train", "configs/dense_tiny.yaml", *overrides, f"run_dir={reference}"]) == 0
    return root, overrides, read_losses(reference), _final_params(reference)


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_exact_resume(resume_setup, how):
    root, overrides, ref_losses, ref_params = resume_setup
    run_dir = root / how
    command = _cli_command(overrides + [f"run_dir={run_dir}"])
    env = dict(os.environ)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    if how == "sigterm":
        _wait_for(lambda: _logged_step(run_dir) >= 7, proc)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        assert proc.returncode == 128 + signal.SIGTERM, proc.stderr.read()
    else:
        # Killed outright once a checkpoint is complete (orbax renames the finished directory).
        _wait_for(lambda: (run_dir / "checkpoints" / "20").is_dir() and _logged_step(run_dir) >= 25, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    interrupted_at = _logged_step(run_dir)
    assert 0 < interrupted_at < 120, "the run must have been interrupted mid-way"
    assert not (run_dir / "summary.json").exists()

    resumed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    losses = read_losses(run_dir)
    assert sorted(losses) == sorted(ref_losses) == list(range(1, 121))
    assert losses == ref_losses  # bit for bit, every step
    for got, want in zip(_final_params(run_dir), ref_params):
        np.testing.assert_array_equal(got, want)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


def test_rerun_of_finished_run_is_a_no_op(resume_setup, capsys):
    root, overrides, ref_losses, _ = resume_setup
    assert cli.main(["train", "configs/dense_tiny.yaml", *overrides, f"run_dir={root / 'reference'}"]) == 0
    assert "already complete" in capsys.readouterr().out
    assert read_losses(root / "reference") == ref_losses


def test_eval_in_micro_batches_equals_one_pass(resume_setup, capsys):
    """Evaluation splits its batches like training (train.microbatches), holding one micro-batch's
    logits at a time; the sums, hence the metrics, are the same."""
    reference = resume_setup[0] / "reference"
    results = []
    for micro in (1, 2):
        assert cli.main(["eval", str(reference), f"train.microbatches={micro}"]) == 0
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    for key in ("eval_loss", "eval_bpb"):
        assert results[1][key] == pytest.approx(results[0][key], rel=1e-6)


def test_eval_and_generate_read_a_finished_run(resume_setup, capsys):
    from lmjax.data import build_data, load_tokenizer

    root, _, _, _ = resume_setup
    reference = root / "reference"
    summary = json.loads((reference / "summary.json").read_text())
    assert cli.main(["eval", str(reference)]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["step"] == 120
    assert evaluated["eval_loss"] == pytest.approx(summary["final_eval_loss"], rel=1e-5)  # same batches, same weights

    # Loss and bits per byte recomputed independently: float64 log-softmax in numpy, and the bytes
    # of the text the target tokens decode to (not the trainer's per-token byte table).
    run = load_run(reference, [f"mesh.{a}=1" for a in ("data", "fsdp", "tensor", "expert")], devices=jax.devices()[:1])
    tokenizer = load_tokenizer(reference / "tokenizer.model")
    data = build_data(replace(run.cfg, **{"data.tokenizer.path": str(reference / "tokenizer.model")}))
    nll, n_bytes = 0.0, 0
    for batch in data.eval_batches(run.cfg.train.eval_batches):
        logits = np.asarray(run.model.apply({"params": run.params}, batch["tokens"], batch["positions"], batch["segment_ids"]), np.float64)
        log_z = logits.max(-1) + np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
        target_logit = np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
        mask = batch["loss_mask"] > 0
        nll += float(((log_z - target_logit) * mask).sum())
        for row_targets, row_mask in zip(batch["targets"], mask):
            # Decode each run of consecutive predicted targets at once, so multi-byte characters stay whole.
            run_start = None
            for i, m in enumerate(list(row_mask) + [False]):
                if m and run_start is None:
                    run_start = i
                elif not m and run_start is not None:
                    n_bytes += len(tokenizer.decode(row_targets[run_start:i]).encode("utf-8"))
                    run_start = None
    assert evaluated["eval_bpb"] == pytest.approx(nll / math.log(2) / n_bytes, rel=2e-3)

    # Generation equals greedy decoding by full recomputation (no KV cache), token by token.
    assert cli.main(["generate", str(reference), "--prompt", "def ", "--max-new-tokens", "8"]) == 0
    generated = capsys.readouterr().out.rstrip("\n")
    ids = tokenizer.encode("def ")
    # One compiled forward over a fixed width: the model is causal, so the columns right of the
    # last real token (zeros) change nothing in its logits.
    forward = jax.jit(lambda row: run.model.apply({"params": run.params}, row[None])[0])
    width = len(ids) + 8
    for _ in range(8):
        logits = forward(jnp.asarray(ids + [0] * (width - len(ids)), jnp.int32))
        ids.append(int(jnp.argmax(logits[len(ids) - 1])))
        if ids[-1] == tokenizer.eos_id:
            ids.pop()
            break
    assert generated == "def " + tokenizer.decode(ids[len(tokenizer.encode("def ")):])


def test_tiny_model_memorizes_a_batch():
    cfg = load_config(
        None,
        ["model.vocab_size=64", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.d_ff=128",
         "data.seq_len=16", "data.global_batch_size=4", "optim.lr=1e-2", "optim.warmup_steps=5",
         "optim.weight_decay=0", "optim.min_lr_ratio=0.01", "train.steps=200", "mesh.data=1"],
    )
    setup = ModelSetup.build(cfg, jax.devices()[:1])
    tokens = np.random.default_rng(0).integers(0, 64, size=(4, 17)).astype(np.int32)
    batch = {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": np.ones((4, 16), np.int32),
        "positions": np.tile(np.arange(16, dtype=np.int32), (4, 1)),
        "loss_mask": np.ones((4, 16), np.float32),
    }
    batch = setup.global_batch(batch)
    with sharding.activate(setup.mesh, setup.rules):
        state = setup.factory.create(0)
        step = setup.train_step()
        first = None
        for _ in range(200):
            state, metrics = step(state, batch)
            first = first if first is not None else float(metrics["loss"])
    assert first > 3.0  # ~log(64) at init: the model did not start out knowing the batch
    assert float(metrics["loss"]) < 0.05


def test_gradient_accumulation_matches_one_big_batch(tmp_path, tiny_overrides):
    base = tiny_overrides + ["train.steps=3", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
    train(load_config(None, base + [f"run_dir={tmp_path / 'full'}"]))
    train(load_config(None, base + [f"run_dir={tmp_path / 'accum'}", "train.microbatches=2"]))
    full, accum = read_losses(tmp_path / "full"), read_losses(tmp_path / "accum")
    for step in (1, 2, 3):
        np.testing.assert_allclose(accum[step], full[step], rtol=1e-5)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_overrides, capsys, monkeypatch):
    """A poisoned third batch (NaN loss mask) must stop the run at step 3 and keep checkpoint 2."""
    import lmjax.tasks.base as task_base  # the causal task builds its data through it

    real_build_data = task_base.build_data

    def poisoned_build_data(cfg, layout=None):
        data = real_build_data(cfg, layout)
        real_iterator = data.train_iterator

        class Poisoned:
            def __init__(self, inner):
                self.inner, self.count = inner, 0

            def __next__(self):
                batch = dict(next(self.inner))
                self.count += 1
                if self.count == 3:
                    batch["loss_mask"] = np.full_like(batch["loss_mask"], np.nan)
                return batch

            def __getattr__(self, name):  # get_state, set_state, close
                return getattr(self.inner, name)

        data.train_iterator = lambda *args: Poisoned(real_iterator(*args))
        return data

    monkeypatch.setattr(task_base, "build_data", poisoned_build_data)
    run_dir = tmp_path / "nan"
    overrides = tiny_overrides + [f"run_dir={run_dir}", "train.checkpoint_every=1", "train.steps=5"]
    assert cli.main(["train", "configs/dense_tiny.yaml", *overrides]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: non-finite loss") and "at step 3" in err and "last good checkpoint: step 2" in err
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == [1, 2]
    params = _final_params(run_dir)  # the kept checkpoint restores, and its weights are finite
    assert all(np.isfinite(p).all() for p in params)
    assert not (run_dir / "summary.json").exists()
