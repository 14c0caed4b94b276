"""The task interface: a task with frozen state (as DPO's reference model will be) gets it created,
sharded as declared, carried through training untouched, saved and restored."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from lmjax.config import load_config
from lmjax.tasks import CausalLMTask
from lmjax.train.checkpoint import Checkpointer
from lmjax.train.loop import train
from lmjax.train.step import ModelSetup

TABLE_SHAPE = (512, 64)  # [vocab, embed] of the tiny config


class FrozenTableTask(CausalLMTask):
    """Causal LM whose loss also reads a frozen [vocab, embed] table (a stand-in for a reference model)."""

    def init_frozen(self, rng, params):
        init = nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed"))
        return {"table": init(rng, TABLE_SHAPE, jnp.float32)}

    def loss(self, params, frozen, batch, model):
        objective, sums = super().loss(params, frozen, batch, model)
        # The loss depends on the frozen table, so a trainer that treated it as a parameter would move it.
        embedded = frozen["table"][batch["tokens"]] @ params["embed"]["embedding"].T[:, :1]
        return objective + 1e-3 * jnp.sum(embedded), sums


def test_frozen_state_is_sharded_as_declared_never_updated_and_restored(tmp_path, tiny_overrides):
    cfg = load_config(None, tiny_overrides + [f"run_dir={tmp_path / 'run'}", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    task = FrozenTableTask(cfg)
    # What init_frozen draws, computed here from the documented key (the init key folded with 1).
    expected = np.asarray(jax.random.normal(jax.random.fold_in(jax.random.key(cfg.seed), 1), TABLE_SHAPE, jnp.float32))
    setup = ModelSetup.build(cfg, task=task)
    state = setup.factory.create(cfg.seed)
    assert state.frozen["table"].sharding.spec == P("tensor", "fsdp")  # vocab -> tensor, embed -> fsdp
    np.testing.assert_array_equal(np.asarray(state.frozen["table"]), expected)

    summary = train(cfg, task=task)
    assert summary["status"] == "completed"
    checkpoints = Checkpointer(tmp_path / "run" / "checkpoints", keep=3, read_only=True)
    assert checkpoints.latest_step() == cfg.train.steps
    for step in (3, cfg.train.steps):  # an intermediate and the final checkpoint
        restored, _ = checkpoints.restore(step, setup.factory.abstract())
        assert restored.frozen["table"].sharding.spec == P("tensor", "fsdp")
        np.testing.assert_array_equal(np.asarray(restored.frozen["table"]), expected)
        assert int(restored.step) == step
    initial_embedding = np.asarray(state.params["embed"]["embedding"])
    assert np.abs(np.asarray(restored.params["embed"]["embedding"]) - initial_embedding).max() > 1e-4  # params did move
    checkpoints.close()
