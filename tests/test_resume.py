"""Resume anywhere: another mesh, device count or micro-batch count continues the loss curve; a
finished run is extended by raising train.steps; an unreadable latest checkpoint falls back to
the one before it.

The end-to-end tests resume copies of one uninterrupted reference run (8 steps, a checkpoint
every 2), cut back to a checkpoint the way a kill leaves them, and compare the resumed losses
with the reference's step by step.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import read_losses

from lmjax import cli
from lmjax.config import load_config
from lmjax.errors import CheckpointError
from lmjax.train.checkpoint import Checkpointer
from lmjax.train.loop import train


# ---------------------------------------------------------------------- the Checkpointer alone
def _tree(step: int) -> dict:
    return {"w": jnp.arange(1000.0) + step, "b": {"c": jnp.full((4, 8), float(step))}, "step": jnp.asarray(step)}


def _abstract(tree: dict) -> dict:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)


def _saved(directory: Path, steps=(1, 2, 3)) -> Path:
    checkpointer = Checkpointer(directory, keep=10)
    for step in steps:
        checkpointer.save(step, _tree(step), {"iterator": {"position": step}})
    checkpointer.wait()
    checkpointer.close()
    return directory


def _array_files(step_dir: Path) -> list[Path]:
    """The files holding the arrays' bytes (orbax's OCDBT data files, one folder per process)."""
    return sorted(step_dir.glob("state/ocdbt.process_*/d/*"))


def _largest_array_file(step_dir: Path) -> Path:
    """One that surely holds array bytes (OCDBT also writes index nodes, some superseded)."""
    return max(_array_files(step_dir), key=lambda p: p.stat().st_size)


def _overwrite_with_garbage(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(max(path.stat().st_size, 16)))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "garbage arrays": lambda d: [_overwrite_with_garbage(p) for p in _array_files(d)],
    "truncated arrays": lambda d: [_truncate(p) for p in _array_files(d)],
    "deleted array file": lambda d: _largest_array_file(d).unlink(),
    "garbage tree metadata": lambda d: _overwrite_with_garbage(d / "state" / "_METADATA"),
    "no data-iterator item": lambda d: shutil.rmtree(d / "data"),
    "empty step directory": lambda d: [shutil.rmtree(p) if p.is_dir() else p.unlink() for p in list(d.iterdir())],
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_unreadable_latest_checkpoint_falls_back_and_is_kept_aside(tmp_path, damage, capsys):
    directory = _saved(tmp_path / "checkpoints")
    DAMAGE[damage](directory / "3")
    checkpointer = Checkpointer(directory, keep=2)
    step, state, data = checkpointer.restore_latest(_abstract(_tree(0)))
    assert step == 2 and data == {"iterator": {"position": 2}}
    np.testing.assert_array_equal(state["w"], np.arange(1000.0) + 2)
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith(f"warning: checkpoint {directory / '3'} is unreadable (")
    assert "resuming from step 2" in warning[0]
    aside = [p.name for p in directory.iterdir() if p.name.startswith("3.unreadable-")]
    assert len(aside) == 1 and aside[0] in warning[0]
    # The step number is free again and max_to_keep (2) cleans up around the set-aside copy.
    for step in (3, 4):
        checkpointer.save(step, _tree(step), {"iterator": {"position": step}})
    checkpointer.wait()
    assert checkpointer.all_steps() == [3, 4]
    assert sorted(p.name for p in directory.iterdir()) == sorted(["3", "4", aside[0]])
    checkpointer.close()


def test_missing_tree_metadata_still_restores(tmp_path):
    """orbax rebuilds the tree from the requested structure: the arrays themselves are intact."""
    directory = _saved(tmp_path / "checkpoints")
    (directory / "3" / "state" / "_METADATA").unlink()
    checkpointer = Checkpointer(directory, keep=10)
    step, state, _ = checkpointer.restore_latest(_abstract(_tree(0)))
    assert step == 3
    np.testing.assert_array_equal(state["b"]["c"], np.full((4, 8), 3.0))
    checkpointer.close()


def test_no_readable_checkpoint_is_one_error_and_moves_nothing(tmp_path):
    directory = _saved(tmp_path / "checkpoints", steps=(1, 2))
    for step in ("1", "2"):
        _overwrite_with_garbage(_largest_array_file(directory / step))
    checkpointer = Checkpointer(directory, keep=10)
    with pytest.raises(CheckpointError) as error:
        checkpointer.restore_latest(_abstract(_tree(0)))
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"no readable checkpoint in {directory}: steps 2, 1 are damaged")
    assert sorted(p.name for p in directory.iterdir()) == ["1", "2"]  # a rerun must not start over silently
    checkpointer.close()


def test_checkpoint_of_another_model_is_an_error_not_a_fallback(tmp_path):
    directory = _saved(tmp_path / "checkpoints")
    other = {**_tree(0), "w": jnp.zeros(999)}
    checkpointer = Checkpointer(directory, keep=10)
    with pytest.raises(CheckpointError, match=r"checkpoint .*/3 does not match this config's model/optimizer \(w has shape"):
        checkpointer.restore_latest(_abstract(other))
    extra = {**_tree(0), "v": jnp.zeros(3)}
    with pytest.raises(CheckpointError, match=r"it lacks 1 array\(s\) of this config's, e.g. v\)"):
        checkpointer.restore_latest(_abstract(extra))
    assert sorted(p.name for p in directory.iterdir()) == ["1", "2", "3"]
    checkpointer.close()


# ---------------------------------------------------------------------- through the trainer
@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_overrides):
    """An uninterrupted 8-step run on 8 devices (data 4 x tensor 2), every checkpoint kept. A
    constant schedule, so a 4-step run raised to 8 steps must follow it exactly."""
    root = tmp_path_factory.mktemp("resume_anywhere")
    overrides = tiny_overrides + ["train.steps=8", "train.checkpoint_every=2", "train.keep_checkpoints=10",
                                  "optim.schedule=constant", "mesh.tensor=2"]
    summary = train(load_config(None, overrides + [f"run_dir={root / 'reference'}"]))
    return root, overrides, read_losses(root / "reference"), summary


def _interrupted_copy(reference_dir: Path, run_dir: Path, checkpoint: int, logged: int) -> Path:
    """The reference as a kill would have left it: checkpoints up to `checkpoint`, metrics up to `logged`."""
    shutil.copytree(reference_dir, run_dir)
    for path in (run_dir / "checkpoints").iterdir():
        if int(path.name) > checkpoint:
            shutil.rmtree(path)
    (run_dir / "summary.json").unlink()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= logged))
    return run_dir


def _loss_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("change, n_devices", [
    (["mesh.tensor=1", "mesh.fsdp=4"], 8),  # data 4 x tensor 2 -> data 2 x fsdp 4
    ([], 4),  # 8 -> 4 devices: data 4 -> 2, tensor 2
    (["train.microbatches=4"], 8),  # 1 -> 4 micro-batches
], ids=["mesh", "devices", "microbatches"])
def test_resume_elsewhere_continues_the_loss_curve(reference, change, n_devices, tmp_path, capsys):
    root, overrides, ref_losses, ref_summary = reference
    run_dir = _interrupted_copy(root / "reference", tmp_path / "run", checkpoint=4, logged=4)
    summary = train(load_config(None, overrides + change + [f"run_dir={run_dir}"]), devices=jax.devices()[:n_devices])
    assert "resuming at step 4" in capsys.readouterr().out
    assert summary["devices"] == n_devices
    losses = read_losses(run_dir)
    assert _loss_steps(run_dir) == list(range(1, 9))
    for step in range(5, 9):
        np.testing.assert_allclose(losses[step], ref_losses[step], rtol=1e-5, err_msg=f"step {step}")
    np.testing.assert_allclose(summary["final_eval_loss"], ref_summary["final_eval_loss"], rtol=1e-5)


def test_unreadable_checkpoints_fall_back_and_the_run_completes(reference, tmp_path, capsys):
    """Killed after logging step 7: checkpoint 6's arrays overwritten with garbage, a file of
    checkpoint 4 deleted. The run resumes from 2, logs every step once, saves 4 and 6 again."""
    root, overrides, ref_losses, _ = reference
    run_dir = _interrupted_copy(root / "reference", tmp_path / "run", checkpoint=6, logged=7)
    checkpoints = run_dir / "checkpoints"
    for path in _array_files(checkpoints / "6"):
        _overwrite_with_garbage(path)
    _largest_array_file(checkpoints / "4").unlink()
    damaged = {step: _digest(checkpoints / step) for step in ("4", "6")}

    train(load_config(None, overrides + ["train.keep_checkpoints=2", f"run_dir={run_dir}"]))
    out, err = capsys.readouterr()
    assert "resuming at step 2" in out
    warnings = [line for line in err.splitlines() if line.startswith("warning: checkpoint")]
    assert [w.split(" is unreadable")[0] for w in warnings] == [f"warning: checkpoint {checkpoints / s}" for s in ("6", "4")]
    assert _loss_steps(run_dir) == list(range(1, 9))
    assert read_losses(run_dir) == ref_losses  # same mesh: bit for bit
    kept = {p.name.split(".")[0]: p for p in checkpoints.iterdir() if ".unreadable-" in p.name}
    assert {step: _digest(path) for step, path in kept.items()} == damaged  # set aside untouched
    assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == [6, 8]  # keep=2, past the kept ones


def _digest(directory: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(directory)).encode() + path.read_bytes())
    return h.hexdigest()


def test_raising_steps_extends_a_finished_run(reference, tmp_path, capsys):
    """A finished 4-step run raised to 8 steps continues from its last checkpoint; with a
    constant schedule that is exactly the uninterrupted 8-step run."""
    root, overrides, ref_losses, _ = reference
    run_dir = tmp_path / "run"
    short = train(load_config(None, overrides + ["train.steps=4", f"run_dir={run_dir}"]))
    assert short["steps"] == 4
    extended = train(load_config(None, overrides + [f"run_dir={run_dir}"]))
    assert "resuming at step 4" in capsys.readouterr().out
    assert extended["steps"] == 8 and extended["tokens"] == 8 * 16 * 32
    assert _loss_steps(run_dir) == list(range(1, 9))
    assert read_losses(run_dir) == ref_losses


def test_extension_follows_the_new_schedule_and_steps_cannot_go_below_a_checkpoint(tiny_overrides, tmp_path, capsys):
    """Extension uses the schedule of the config it is given, lr(step) of the new train.steps:
    a cosine finished at its floor restarts its decay from where the longer cosine would be at
    that step (up again), ending at the floor at the new last step. Steps before the extension
    keep the values they were trained with."""
    run_dir = tmp_path / "cosine"
    overrides = tiny_overrides + ["train.steps=4", "train.checkpoint_every=2", "optim.schedule=cosine",
                                  "optim.warmup_steps=2", "optim.lr=3e-3", "optim.min_lr_ratio=0.1", f"run_dir={run_dir}"]
    assert cli.main(["train", "configs/dense_tiny.yaml", *overrides]) == 0
    first = {r["step"]: r["lr"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "lr" in r}
    assert cli.main(["train", str(run_dir), "train.steps=8"]) == 0  # the run directory's config, steps raised
    capsys.readouterr()
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "lr" in r}
    peak, floor, warmup, steps = 3e-3, 3e-4, 2, 8
    for step in range(5, 9):  # optax's warmup-cosine written out: the decay spans steps warmup..8
        expected = floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
        assert lrs[step] == pytest.approx(expected, rel=1e-6), step
    assert {s: lrs[s] for s in range(1, 5)} == first and first[4] == pytest.approx(floor)
    assert lrs[5] > lrs[4]  # the consequence: the learning rate goes back up
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 8

    assert cli.main(["train", str(run_dir), "train.steps=6"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: train.steps=6 is below step 8 of the latest checkpoint")
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 8  # nothing touched


def test_a_finished_run_without_checkpoints_cannot_be_extended(reference, tmp_path):
    root, overrides, _, _ = reference
    run_dir = tmp_path / "run"
    shutil.copytree(root / "reference", run_dir, ignore=shutil.ignore_patterns("checkpoints"))
    with pytest.raises(CheckpointError, match=r"holds a completed run without checkpoints; it cannot be extended to train.steps=10"):
        train(load_config(None, overrides + ["train.steps=10", f"run_dir={run_dir}"]))
    assert read_losses(run_dir) == read_losses(root / "reference")  # its metrics untouched
