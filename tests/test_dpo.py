"""DPO (`train.objective: dpo`): the losses, per-pair response log-probabilities, the frozen
reference (bit-identical, resumable, sharded like the policy), the precomputed reference, and bad input."""

from __future__ import annotations

import functools
import json
import math
import shutil
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax import flops
from lmjax.config import ConfigError, load_config
from lmjax.data.corpus import DataError
from lmjax.data.post_training import build_preference_data
from lmjax.errors import CheckpointError
from lmjax.evaluate import load_run
from lmjax.models import build_model
from lmjax.tasks.dpo import REFERENCE_FILE, DPOTask, preference_losses, response_logps
from lmjax.train.checkpoint import Checkpointer
from lmjax.train.loop import train
from lmjax.train.step import ModelSetup

STEPS = 4
TIMING = ("tokens_per_sec", "tflops_per_sec", "mfu", "step_time_s")  # wall-clock fields of a logged step
BODIES = {"add": "x + y", "sub": "x - y", "mul": "x * y", "max": "max(x, y)", "min": "min(x, y)", "pow": "x ** y"}


def preference_record(i: int) -> dict:
    """A short Python function to complete: the right body is preferred to a wrong one."""
    op = list(BODIES)[i % len(BODIES)]
    wrong = "    return None  # todo\n" if i % 2 else "    pass\n"
    return {"prompt": f'def {op}_{i}(x, y):\n    """The {op} of x and y, case {i}."""\n', "chosen": f"    return {BODIES[op]}\n",
            "rejected": wrong + "    " * (i % 3) + "# " * (i % 4) + "\n"}


def write_jsonl(path: Path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def read_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def curve(run_dir: Path) -> list[dict]:
    """Every logged record without its wall-clock fields: what an exact resume must reproduce."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_records(run_dir)]


def train_records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_records(run_dir) if "loss" in r}


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def assert_trees_equal(got, want) -> None:
    got, want = leaves(got), leaves(want)
    assert len(got) == len(want) > 0
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def restore(run_dir: Path, cfg, step: int, devices=None):
    setup = ModelSetup.build(cfg, devices)
    checkpointer = Checkpointer(Path(run_dir) / "checkpoints", keep=10, read_only=True)
    try:
        state, _ = checkpointer.restore(step, setup.factory.abstract())
    finally:
        checkpointer.close()
    return setup, state


def interrupt_after_checkpoint(run_dir: Path, copy: Path, step: int) -> None:
    """`copy` = `run_dir` as a run killed after its checkpoint `step` was written (later
    checkpoints and the summary gone, later metric lines still there, as a kill leaves them)."""
    shutil.copytree(run_dir, copy)
    for later in (copy / "checkpoints").iterdir():
        if later.name.isdigit() and int(later.name) > step:
            shutil.rmtree(later)
    (copy / "summary.json").unlink()


def pairs_of(logps, valid) -> np.ndarray:
    """[B, 2, L] per-slot log-probabilities -> [n_pairs, 2] in pair order: rows pack pairs in file
    order, each row's pairs in slots 0, 1, ..., so the valid slots read row by row are the pairs."""
    logps, valid = np.asarray(logps), np.asarray(valid)
    return logps.transpose(0, 2, 1)[valid]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def preference_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("preferences")
    train_path = write_jsonl(folder / "train.jsonl", [preference_record(i) for i in range(64)])
    val_path = write_jsonl(folder / "val.jsonl", [preference_record(i) for i in range(1000, 1008)])
    return train_path, val_path


@pytest.fixture(scope="module")
def dpo_overrides(tiny_overrides, preference_files):
    dropped = ("data.max_documents", "data.val_fraction", "data.seq_len", "train.steps", "train.checkpoint_every")
    return [o for o in tiny_overrides if not o.startswith(dropped)] + [
        "train.objective=dpo", f"data.paths=[{preference_files[0]}]", f"data.val_paths=[{preference_files[1]}]",
        "data.seq_len=64", "train.z_loss=0", f"train.steps={STEPS}", "train.checkpoint_every=2", "mesh.data=1",
    ]


@pytest.fixture(scope="module")
def dpo_cfg(dpo_overrides, tmp_path_factory):
    return load_config(None, dpo_overrides + [f"run_dir={tmp_path_factory.mktemp('dpo') / 'model'}"])


@pytest.fixture(scope="module")
def dpo_data(dpo_cfg):
    return build_preference_data(dpo_cfg)


@pytest.fixture(scope="module")
def model_run(dpo_cfg):
    """A DPO run from a random initialisation (the reference is that initialisation), on one device."""
    train(dpo_cfg, devices=jax.devices()[:1])
    return Path(dpo_cfg.run_dir)


@pytest.fixture(scope="module")
def initial_params(dpo_cfg):
    """The parameters the run starts from: a fresh step-0 state of the same config and seed."""
    setup = ModelSetup.build(dpo_cfg, jax.devices()[:1])
    return jax.device_get(setup.factory.create(dpo_cfg.seed).params)


def all_rows(split, pad_id: int) -> dict[str, np.ndarray]:
    return split.rows(np.arange(split.num_rows), pad_id)


@functools.partial(jax.jit, static_argnums=0)
def _logps(model, params, batch):
    return response_logps(model, params, batch)[:2]


def logps_of(model, params, batch: dict, rows: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """`response_logps` (log-probabilities, valid pairs) of a batch, `rows` rows at a time (one
    compilation serves every batch; empty padding rows are dropped again)."""
    n = len(batch["chosen_tokens"])
    padded = {k: np.concatenate([v, np.zeros((-n % rows, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}
    parts = [_logps(model, params, {k: v[i : i + rows] for k, v in padded.items()}) for i in range(0, n, rows)]
    return tuple(np.concatenate([np.asarray(part[j]) for part in parts])[:n] for j in range(2))


# ----------------------------------------------------------------------------- losses


def test_preference_losses_equal_hand_written_formulas():
    h = np.array([-30.0, -2.5, -0.3, 0.0, 1e-3, 0.7, 4.0, 25.0], np.float32)
    log_sigmoid = lambda x: -np.logaddexp(0.0, -x)  # noqa: E731  (float64, stable)
    h64 = h.astype(np.float64)
    for beta in (0.1, 0.5, 2.0):
        expected = {
            "sigmoid": -log_sigmoid(beta * h64),
            "ipo": (h64 - 1 / (2 * beta)) ** 2,
        }
        for eps in (0.1, 0.3):
            expected[f"conservative:{eps}"] = -(1 - eps) * log_sigmoid(beta * h64) - eps * log_sigmoid(-beta * h64)
        for name, want in expected.items():
            loss, _, eps = name.partition(":")
            got = np.asarray(preference_losses(jnp.asarray(h), beta, loss, float(eps or 0.0)))
            np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6, err_msg=f"{name}, beta {beta}")
    # At h = 0 (policy = reference) the sigmoid and conservative losses are log 2, ipo 1 / (4 beta^2).
    for loss in ("sigmoid", "conservative"):
        assert float(preference_losses(jnp.zeros(()), 0.1, loss, 0.2)) == pytest.approx(math.log(2), abs=1e-6)
    assert float(preference_losses(jnp.zeros(()), 0.1, "ipo")) == pytest.approx(25.0, rel=1e-6)
    with pytest.raises(ValueError, match="dpo.loss"):
        preference_losses(jnp.zeros(()), 0.1, "hinge")


# ----------------------------------------------------------------------------- response log-probabilities


def numpy_response_logps(model, params, tokenizer, records: list[dict], side: str, width: int) -> np.ndarray:
    """log p(response | prompt) of each record, from the model applied to each rendered conversation
    alone (right-padded, causal: padding after it changes nothing), log-softmax in float64."""
    ids, response_lengths = [], []
    for record in records:
        response = tokenizer.encode(record[side]) + [tokenizer.piece_id("<|end|>")]
        prompt = [tokenizer.piece_id("<|user|>"), *tokenizer.encode(record["prompt"]), tokenizer.piece_id("<|end|>"),
                  tokenizer.piece_id("<|assistant|>")]
        ids.append(prompt + response)
        response_lengths.append(len(response))
    tokens = np.zeros((len(ids), width), np.int32)
    for i, sequence in enumerate(ids):
        assert len(sequence) <= width + 1
        tokens[i, : len(sequence) - 1] = sequence[:-1]
    logits = np.asarray(jax.jit(lambda p, t: model.apply({"params": p}, t))(params, tokens), np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    out = np.zeros(len(ids))
    for i, (sequence, n) in enumerate(zip(ids, response_lengths)):
        for t in range(len(sequence) - n, len(sequence)):  # target t is predicted at position t - 1
            out[i] += log_probs[i, t - 1, sequence[t]]
    return out


def test_response_logps_sum_only_response_tokens_per_pair_packed_or_not(dpo_overrides, dpo_data, preference_files, tmp_path):
    cfg = load_config(None, dpo_overrides + [f"run_dir={tmp_path / 'r'}"])
    unpacked = build_preference_data(load_config(None, dpo_overrides + ["dpo.pack=false", f"run_dir={tmp_path / 'r'}"]))
    tokenizer, pad = dpo_data.tokenizer, dpo_data.tokenizer.pad_id
    assert unpacked.tokenizer.path == tokenizer.path
    model = build_model(cfg.model)
    params = nn.unbox(model.init(jax.random.key(7), jnp.zeros((1, 64), jnp.int32))["params"])
    records = [json.loads(line) for line in Path(preference_files[0]).read_text().splitlines()]

    # One pair per row: pair i in row i, slot 0; its log-probabilities are the numpy ones.
    n = 16
    batch = unpacked.train.rows(np.arange(n), pad)
    logps, valid = logps_of(model, params, batch)
    assert logps.shape == (n, 2, 64) and valid.shape == (n, 64)
    np.testing.assert_array_equal(valid, np.broadcast_to(np.arange(64) == 0, (n, 64)))
    for s, side in enumerate(("chosen", "rejected")):
        expected = numpy_response_logps(model, params, tokenizer, records[:n], side, 64)
        assert np.all(expected < -5), "random-init log-probabilities of whole responses are far from 0"
        np.testing.assert_allclose(logps[:, s, 0], expected, rtol=1e-5, atol=1e-4)
        assert np.all(logps[:, s, 1:] == 0)
    # The two sides differ, so a swapped or merged side would show.
    assert np.all(np.abs(logps[:, 0, 0] - logps[:, 1, 0]) > 1e-3)

    # Targets the loss mask excludes (prompt tokens, padding) and padding inputs change nothing.
    rng = np.random.default_rng(0)
    changed = dict(batch)
    for side in ("chosen", "rejected"):
        untrained = batch[f"{side}_loss_mask"] == 0
        assert untrained.sum() > (batch[f"{side}_segment_ids"] == 0).sum(), "prompt targets are untrained too"
        changed[f"{side}_targets"] = np.where(untrained, rng.integers(0, 512, untrained.shape), batch[f"{side}_targets"]).astype(np.int32)
        padding = batch[f"{side}_segment_ids"] == 0
        changed[f"{side}_tokens"] = np.where(padding, rng.integers(0, 512, padding.shape), batch[f"{side}_tokens"]).astype(np.int32)
    got = logps_of(model, params, changed)[0]
    np.testing.assert_array_equal(got, logps)
    # ... while a response target does change its pair's log-probability.
    changed = dict(batch)
    first_response = int(np.argmax(batch["chosen_loss_mask"][0] > 0))
    changed["chosen_targets"] = batch["chosen_targets"].copy()
    changed["chosen_targets"][0, first_response] = (batch["chosen_targets"][0, first_response] + 1) % 512
    got = logps_of(model, params, changed)[0]
    assert got[0, 0, 0] != logps[0, 0, 0]
    np.testing.assert_array_equal(got[1:], logps[1:])
    np.testing.assert_array_equal(got[0, 1], logps[0, 1])

    # Packed rows (several pairs a row) give each pair the log-probabilities it has alone in a row.
    alone = pairs_of(*logps_of(model, params, all_rows(unpacked.train, pad)))
    packed_batch = all_rows(dpo_data.train, pad)
    assert packed_batch["chosen_segment_ids"].max() >= 2, "rows should pack several pairs"
    packed = pairs_of(*logps_of(model, params, packed_batch))
    assert packed.shape == alone.shape == (64, 2)
    np.testing.assert_allclose(packed, alone, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- training


def test_dpo_loss_starts_at_log_2_and_training_raises_the_margin(model_run, dpo_cfg, dpo_overrides, dpo_data, initial_params):
    records = train_records(model_run)
    assert sorted(records) == list(range(1, STEPS + 1))
    first = records[1]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for name in ("reward_chosen", "reward_rejected", "reward_margin", "kl", "reward_accuracy"):
        assert first[f"dpo/{name}"] == 0.0, name  # the policy is the reference: every log-ratio is exactly 0
    assert records[STEPS]["loss"] < first["loss"] - 0.05

    # The task's loss on a real batch with the reference equal to the policy, for each loss.
    model, pad = build_model(dpo_cfg.model), dpo_data.tokenizer.pad_id
    batch = {k: jnp.asarray(v) for k, v in dpo_data.train.rows(np.arange(16), pad).items()}
    for changes, expected in (((), math.log(2)), (("dpo.loss=conservative", "dpo.label_smoothing=0.2"), math.log(2)),
                              (("dpo.loss=ipo", "dpo.beta=0.5"), 1.0)):
        task = DPOTask(load_config(None, dpo_overrides + list(changes)))
        sums = jax.jit(lambda p, b: task.loss(p, {"reference": p}, b, model)[1])(initial_params, batch)
        assert float(sums["pairs"]) == float(np.sum(batch["chosen_segment_ids"].max(axis=1))) > 16
        assert float(sums["loss_sum"] / sums["pairs"]) == pytest.approx(expected, abs=1e-6), changes

    # h = chosen log-ratio - rejected log-ratio on fixed batches: 0 for the initial policy, up after training.
    _, state = restore(model_run, dpo_cfg, STEPS, jax.devices()[:1])
    reference = state.frozen["reference"]
    train_batch = dpo_data.train.rows(np.arange(16), pad)
    val_batch = all_rows(dpo_data.validation, pad)
    ratios = {}
    for name, fixed in (("train", train_batch), ("val", val_batch)):
        ref = pairs_of(*logps_of(model, reference, fixed))
        before = pairs_of(*logps_of(model, initial_params, fixed)) - ref
        ratios[name] = pairs_of(*logps_of(model, state.params, fixed)) - ref
        np.testing.assert_array_equal(before, 0.0)
        h = ratios[name][:, 0] - ratios[name][:, 1]
        assert h.mean() > 1.0 and (h > 0).mean() > 0.9, (name, h)
    # The logged evaluation (all 8 validation pairs) is the mean over pairs of these log-ratios.
    beta, ratios = dpo_cfg.dpo.beta, ratios["val"]
    h = ratios[:, 0] - ratios[:, 1]
    evaluation = [r for r in read_records(model_run) if "eval_loss" in r][-1]
    assert evaluation["eval_pairs"] == 8 == len(h)
    np.testing.assert_allclose(evaluation["eval_loss"], np.mean(np.logaddexp(0.0, -beta * h)), rtol=1e-5)
    np.testing.assert_allclose(evaluation["eval_dpo/reward_margin"], beta * h.mean(), rtol=1e-5)
    np.testing.assert_allclose(evaluation["eval_dpo/reward_chosen"], beta * ratios[:, 0].mean(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(evaluation["eval_dpo/kl"], ratios[:, 0].mean(), rtol=1e-5, atol=1e-6)
    assert evaluation["eval_dpo/reward_accuracy"] == np.mean(h > 0)


def test_frozen_reference_is_the_initial_policy_bit_for_bit_and_survives_a_resume(model_run, dpo_cfg, dpo_overrides, initial_params,
                                                                                  tmp_path):
    for step in (2, STEPS):
        _, state = restore(model_run, dpo_cfg, step, jax.devices()[:1])
        assert set(state.frozen) == {"reference"}
        assert_trees_equal(state.frozen["reference"], initial_params)
    moved = [np.abs(a - b).max() for a, b in zip(leaves(state.params), leaves(initial_params))]
    assert max(moved) > 1e-3, "the policy must have moved away from the reference"
    final_params = leaves(state.params)

    # Killed after checkpoint 2 and rerun with the same config: the same curve, the same reference.
    resumed = tmp_path / "resumed"
    interrupt_after_checkpoint(model_run, resumed, 2)
    summary = train(load_config(None, dpo_overrides + [f"run_dir={resumed}"]), devices=jax.devices()[:1])
    assert summary["steps"] == STEPS
    assert curve(resumed) == curve(model_run)
    _, state = restore(resumed, dpo_cfg, STEPS, jax.devices()[:1])
    assert_trees_equal(state.frozen["reference"], initial_params)
    for got, want in zip(leaves(state.params), final_params):
        np.testing.assert_array_equal(got, want)


def test_reference_is_sharded_like_the_policy_and_sharded_dpo_equals_one_device(model_run, dpo_overrides, tmp_path):
    overrides = [o for o in dpo_overrides if o != "mesh.data=1"] + ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
    cfg = load_config(None, overrides + [f"run_dir={tmp_path / 'eight'}"])
    setup = ModelSetup.build(cfg)
    specs = lambda tree: jax.tree.map(lambda s: tuple(s.spec), tree, is_leaf=lambda s: hasattr(s, "spec"))  # noqa: E731
    frozen_specs, param_specs = specs(setup.factory.shardings.frozen["reference"]), specs(setup.factory.shardings.params)
    assert frozen_specs == param_specs
    used = {axis for spec in jax.tree.leaves(param_specs, is_leaf=lambda s: isinstance(s, tuple)) for axis in spec}
    assert {"fsdp", "tensor"} <= used, "the comparison needs sharded parameters"
    initial = setup.factory.create(cfg.seed)
    for frozen, param in zip(jax.tree.leaves(initial.frozen["reference"]), jax.tree.leaves(initial.params)):
        assert frozen.sharding == param.sharding and frozen.sharding.mesh.devices.size == 8
    initial = jax.device_get(initial.params)

    summary = train(cfg)
    assert summary["devices"] == 8
    one, eight = train_records(model_run), train_records(tmp_path / "eight")
    assert sorted(eight) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        for key in ("loss", "grad_norm", "dpo/reward_margin"):
            np.testing.assert_allclose(eight[step][key], one[step][key], rtol=1e-4, atol=1e-6, err_msg=f"{key} at step {step}")
    assert one[STEPS]["loss"] < one[1]["loss"] - 0.05  # the losses move: the comparison covers the update
    _, state = restore(tmp_path / "eight", cfg, STEPS)
    for frozen, param in zip(jax.tree.leaves(state.frozen["reference"]), jax.tree.leaves(state.params)):
        assert frozen.sharding.is_equivalent_to(param.sharding, frozen.ndim)
    assert_trees_equal(state.frozen["reference"], initial)


def test_dpo_from_a_pretrained_run_keeps_its_parameters_as_the_sharded_reference(tiny_overrides, dpo_overrides, tmp_path):
    source = tmp_path / "pretrained"
    train(load_config(None, tiny_overrides + [f"run_dir={source}", "mesh.data=1"]), devices=jax.devices()[:1])
    source_params = leaves(load_run(source, devices=jax.devices()[:1]).params)
    overrides = [o for o in dpo_overrides if not o.startswith(("model.", "mesh.data"))]
    cfg = load_config(None, overrides + [f"run_dir={tmp_path / 'dpo'}", f"train.init_from={source}",
                                         "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    summary = train(cfg)
    assert summary["init_from_step"] == 6
    assert train_records(tmp_path / "dpo")[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    _, state = restore(tmp_path / "dpo", cfg, STEPS)
    for frozen, param, want in zip(jax.tree.leaves(state.frozen["reference"]), jax.tree.leaves(state.params), source_params, strict=True):
        assert frozen.sharding.is_equivalent_to(param.sharding, frozen.ndim) and frozen.sharding.mesh.devices.size == 8
        np.testing.assert_array_equal(np.asarray(frozen), want)
    moved = [np.abs(np.asarray(a) - b).max() for a, b in zip(jax.tree.leaves(state.params), source_params)]
    assert max(moved) > 1e-4, "the policy must have moved away from the reference"


def test_precomputed_reference_equals_the_model_reference_and_resumes_exactly(model_run, dpo_overrides, dpo_data, initial_params,
                                                                               dpo_cfg, tmp_path):
    run_dir = tmp_path / "precomputed"
    cfg = load_config(None, dpo_overrides + ["dpo.reference=precomputed", f"run_dir={run_dir}"])
    setup = ModelSetup.build(cfg, jax.devices()[:1])
    assert setup.factory.shardings.frozen == {}  # no reference parameters are kept
    train(cfg, devices=jax.devices()[:1])
    with_model, precomputed = train_records(model_run), train_records(run_dir)
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(precomputed[1][key], with_model[1][key], rtol=1e-6, atol=1e-6, err_msg=key)
    for step in range(2, STEPS + 1):
        np.testing.assert_allclose(precomputed[step]["loss"], with_model[step]["loss"], rtol=1e-4)
    # TFLOP/s and MFU count the reference's forward pass when it runs in the step: 4 forward-pass
    # equivalents per trained token instead of the policy's 3 (forward + backward).
    policy_only = flops.model_flops_per_token(cfg.model, cfg.data.seq_len)
    summaries = {name: json.loads((d / "summary.json").read_text()) for name, d in (("model", model_run), ("precomputed", run_dir))}
    assert summaries["precomputed"]["model_flops_per_token"] == pytest.approx(policy_only, rel=1e-12)
    assert summaries["model"]["model_flops_per_token"] == pytest.approx(policy_only * 4 / 3, rel=1e-12)

    # reference_logps.npz: every pair's log-probabilities under the initial parameters.
    with np.load(run_dir / REFERENCE_FILE) as saved:
        reference = {split: saved[split] for split in ("train", "val")}
    assert reference["train"].shape == (64, 2) and reference["val"].shape == (8, 2)
    model = build_model(cfg.model)
    pad = dpo_data.tokenizer.pad_id
    for name, split in (("train", dpo_data.train), ("val", dpo_data.validation)):
        np.testing.assert_allclose(reference[name], pairs_of(*logps_of(model, initial_params, all_rows(split, pad))), rtol=1e-5, atol=1e-5)

    # Killed after checkpoint 2: the rerun reads the saved reference and continues the same curve.
    resumed = tmp_path / "resumed"
    interrupt_after_checkpoint(run_dir, resumed, 2)
    saved_bytes = (resumed / REFERENCE_FILE).read_bytes()
    train(load_config(None, dpo_overrides + ["dpo.reference=precomputed", f"run_dir={resumed}"]), devices=jax.devices()[:1])
    assert curve(resumed) == curve(run_dir)
    assert (resumed / REFERENCE_FILE).read_bytes() == saved_bytes
    # Without the file a resumed run cannot recompute it (its parameters have moved): an error, not a new reference.
    lost = tmp_path / "lost"
    interrupt_after_checkpoint(run_dir, lost, 2)
    (lost / REFERENCE_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"{REFERENCE_FILE} not found"):
        train(load_config(None, dpo_overrides + ["dpo.reference=precomputed", f"run_dir={lost}"]), devices=jax.devices()[:1])


# ----------------------------------------------------------------------------- bad input


def test_bad_preference_records_name_file_line_and_key(tmp_path, dpo_overrides, dpo_data, preference_files):
    def build(records, extra=(), val_records=None):
        path = write_jsonl(tmp_path / "bad.jsonl", records)
        val = write_jsonl(tmp_path / "bad_val.jsonl", val_records) if val_records else preference_files[1]
        overrides = [o for o in dpo_overrides if not o.startswith(("data.paths", "data.val_paths"))]
        return build_preference_data(load_config(None, overrides + [
            f"data.paths=[{path}]", f"data.val_paths=[{val}]", f"run_dir={tmp_path / 'r'}",
            f"data.tokenizer.path={dpo_data.tokenizer.path}", *extra]))

    good = [preference_record(i) for i in range(30)]
    missing_chosen = {k: v for k, v in preference_record(99).items() if k != "chosen"}
    cases = [
        (missing_chosen, "missing key 'chosen' (dpo.chosen_key)"),
        ({**preference_record(99), "rejected": "  \n"}, "key 'rejected' (dpo.rejected_key) is empty"),
        ({**preference_record(99), "chosen": 3}, "key 'chosen' (dpo.chosen_key) holds a number"),
    ]
    for record, message in cases:
        with pytest.raises(DataError) as error:
            build(good[:3] + [record] + good[3:])
        text = str(error.value)
        assert text.startswith(f"{tmp_path / 'bad.jsonl'}:4: ") and message in text and "\n" not in text, text
    # Keys named by the dpo section: the error names the configured key and its setting.
    renamed = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in good]
    with pytest.raises(DataError) as error:
        build(renamed[:3] + [{"question": "q", "chosen": "a", "bad": "b"}] + renamed[3:],
              ("dpo.prompt_key=question", "dpo.chosen_key=good", "dpo.rejected_key=bad"), val_records=renamed[:2])
    assert str(error.value).startswith(f"{tmp_path / 'bad.jsonl'}:4: missing key 'good' (dpo.chosen_key)")

    long_prompt = {"prompt": "x = 1\n" * 80, "chosen": "    return 1\n", "rejected": "    pass\n"}
    with pytest.raises(DataError) as error:
        build(good + [long_prompt])
    text = str(error.value)
    assert text.startswith(f"{tmp_path / 'bad.jsonl'}:31: key 'prompt' has a prompt of ") and "data.seq_len=64" in text
    assert "\n" not in text
    with pytest.raises(DataError, match=r"^.*bad_val.jsonl:2: key 'prompt' has a prompt of \d+ tokens"):
        build(good, val_records=[preference_record(500), long_prompt])
    dropped = build(good + [long_prompt], ["dpo.overlong=drop"])
    assert dropped.stats["overlong"]["train"] == {"truncated": 0, "dropped": 1}
    assert dropped.train.rows(np.arange(dropped.train.num_rows), 0)["chosen_segment_ids"].max(axis=1).sum() == 30  # the rest are packed

    for smoothing in ("0.7", "0.5", "0.0"):
        with pytest.raises(ConfigError, match=r"dpo.label_smoothing must be in \(0, 0.5\) with dpo.loss=conservative") as err:
            load_config(None, dpo_overrides + ["dpo.loss=conservative", f"dpo.label_smoothing={smoothing}"])
        assert "\n" not in str(err.value)
    assert load_config(None, dpo_overrides + ["dpo.loss=conservative", "dpo.label_smoothing=0.2"]).dpo.label_smoothing == 0.2
