"""`train.init_from`: a run that starts from another run's parameters, on any mesh."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

from lmjax.config import ConfigError, load_config
from lmjax.errors import CheckpointError
from lmjax.evaluate import evaluate_run, load_run
from lmjax.train.init_from import load_source_params
from lmjax.train.loop import train
from lmjax.train.step import ModelSetup


@pytest.fixture(scope="module")
def source_run(tmp_path_factory, tiny_overrides):
    run_dir = tmp_path_factory.mktemp("init_from") / "source"
    train(load_config(None, tiny_overrides + [f"run_dir={run_dir}", "mesh.data=1"]), devices=jax.devices()[:1])
    return run_dir


def test_init_from_restores_the_source_parameters_exactly_onto_another_mesh(source_run, tmp_path, tiny_overrides):
    source = load_run(source_run, devices=jax.devices()[:1])
    # The model section comes from the source: the config here gives none of its keys.
    overrides = [o for o in tiny_overrides if not o.startswith("model.")]
    cfg = load_config(None, overrides + [f"run_dir={tmp_path / 'tuned'}", f"train.init_from={source_run}",
                                         "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    assert cfg.model == source.cfg.model
    assert cfg.data.tokenizer.path == str(source_run / "tokenizer.model")
    setup = ModelSetup.build(cfg)
    params, step = load_source_params(cfg, setup)
    assert step == source.step == 6
    expected, got = jax.tree.leaves(jax.device_get(source.params)), jax.tree.leaves(params)
    assert len(expected) == len(got)
    for want, have in zip(expected, got):
        assert have.sharding.mesh.devices.size == 8
        np.testing.assert_array_equal(np.asarray(have), want)
    # A run from it starts at step 0 with a fresh optimizer: at lr ~ 0 its first eval equals the source's.
    copy = tmp_path / "source_copy"
    shutil.copytree(source_run, copy)
    summary = train(load_config(None, overrides + [f"run_dir={tmp_path / 'frozen'}", f"train.init_from={copy}",
                                                   "optim.lr=1e-30", "train.steps=1", "mesh.data=1"]), devices=jax.devices()[:1])
    source_summary = json.loads((source_run / "summary.json").read_text())
    assert summary["final_eval_loss"] == pytest.approx(source_summary["final_eval_loss"], rel=1e-6)
    assert (summary["init_from"], summary["init_from_step"]) == (str(copy), 6)
    # Once started, a run does not need its source: eval reads its own config, checkpoint and tokenizer.
    shutil.rmtree(copy)
    evaluated = evaluate_run(tmp_path / "frozen", ["mesh.data=-1"])
    assert evaluated["eval_loss"] == pytest.approx(summary["final_eval_loss"], rel=1e-6)
    # Any kept checkpoint can be evaluated (`lmjax eval --step`); a step that was not kept is named.
    assert evaluate_run(source_run, ["mesh.data=-1"], step=3)["step"] == 3
    with pytest.raises(CheckpointError, match=r"has no checkpoint of step 4; it has steps 3, 6"):
        evaluate_run(source_run, step=4)


def test_init_from_refuses_shape_changes_another_tokenizer_and_runs_without_checkpoints(source_run, tmp_path, tiny_overrides):
    base = [f"run_dir={tmp_path / 'x'}", f"train.init_from={source_run}"]
    with pytest.raises(ConfigError, match=r"^model.d_model=128 differs from the train.init_from run .* \(model.d_model: 64\)") as err:
        load_config(None, base + ["model.d_model=128"])
    assert "\n" not in str(err.value)
    assert load_config(None, base + ["model.d_model=64", "model.remat=full"]).model.remat == "full"  # same shape, compute only
    # Settings that mean what the source's mean are accepted: 4 query heads over 2 KV heads, head_dim 16 = 64 / 4.
    assert load_config(None, base + ["model.n_kv_heads=2", "model.head_dim=16", "model.positions=rope"]).model.head_dim is None
    with pytest.raises(ConfigError, match="data.tokenizer.path=.* differs from the train.init_from run's tokenizer"):
        load_config(None, base + [f"data.tokenizer.path={tmp_path / 'other.model'}"])
    with pytest.raises(ConfigError, match="is neither an lmjax run directory"):
        load_config(None, [f"train.init_from={tmp_path}"])
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    (untrained / "config.yaml").write_text((source_run / "config.yaml").read_text())
    (untrained / "tokenizer.model").write_bytes((source_run / "tokenizer.model").read_bytes())
    cfg = load_config(None, [o for o in tiny_overrides if not o.startswith("model.")] + [f"run_dir={tmp_path / 'y'}", f"train.init_from={untrained}"])
    with pytest.raises(CheckpointError, match="has no checkpoints/ folder"):
        load_source_params(cfg, ModelSetup.build(cfg, jax.devices()[:1]))
