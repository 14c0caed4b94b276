"""The train step's StableHLO rewrite: checkpointing's float32 identity roundings are dropped, nothing
else changes, and the step computes the same bits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lmjax import sharding
from lmjax.config import load_config
from lmjax.train.stablehlo_rewrite import drop_identity_reduce_precision
from lmjax.train.step import ModelSetup, compile_train_step

REDUCE_PRECISION_HLO = "reduce-precision("


def checkpointed_gradient(dtype):
    """A jitted gradient through `jax.checkpoint` that saves its matmuls (jax rounds each saved
    residual to its dtype's format), and its arguments."""
    w = jnp.asarray(np.random.default_rng(0).normal(size=(16, 16)), dtype)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(8, 16)), dtype)
    block = jax.checkpoint(lambda x, w: jnp.tanh(jnp.sin(x @ w) @ w), policy=jax.checkpoint_policies.dots_saveable)
    return jax.jit(jax.grad(lambda x, w: block(x, w).astype(jnp.float32).sum(), argnums=(0, 1))), (x, w)


def test_float32_identity_roundings_are_dropped_and_the_result_keeps_its_bits():
    # Two jitted functions: jax caches a function's lowering, and the rewrite works on it in place.
    gradient, args = checkpointed_gradient(jnp.float32)
    reference = checkpointed_gradient(jnp.float32)[0].lower(*args).compile()
    assert REDUCE_PRECISION_HLO in reference.as_text()  # what there is to drop, or this test says nothing
    lowered = gradient.lower(*args)
    assert drop_identity_reduce_precision(lowered.compiler_ir("stablehlo")) == 2  # the two saved products
    assert "reduce_precision" not in lowered.as_text()
    rewritten = lowered.compile()  # compiles the module rewritten in place
    assert REDUCE_PRECISION_HLO not in rewritten.as_text()
    jax.tree.map(np.testing.assert_array_equal, rewritten(*args), reference(*args))


def test_bfloat16_roundings_stay():
    # In bfloat16 the rounding is what stops XLA's excess precision: not an identity, kept.
    gradient, args = checkpointed_gradient(jnp.bfloat16)
    lowered = gradient.lower(*args)
    assert "reduce_precision" in lowered.as_text()
    assert drop_identity_reduce_precision(lowered.compiler_ir("stablehlo")) == 0
    assert "reduce_precision" in lowered.as_text()


def test_train_step_is_compiled_without_them_and_takes_the_same_steps(tiny_overrides, tmp_path, monkeypatch):
    # One device: the MKL matmul and the attention kernel run, whose saved outputs were copied.
    cfg = load_config(None, tiny_overrides + [f"run_dir={tmp_path}", "model.remat=dots", "model.attention=blockwise"])
    setup = ModelSetup.build(cfg, jax.devices()[:1])
    rows, length = cfg.data.global_batch_size, cfg.data.seq_len
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (rows, length + 1), dtype=np.int32)
    host_batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
                  "segment_ids": np.ones((rows, length), np.int32), "loss_mask": np.ones((rows, length), np.float32)}
    assert host_batch.keys() == setup.task.batch_schema(rows).keys()
    with sharding.activate(setup.mesh, setup.rules):
        batch = setup.global_batch(host_batch)
        reference = setup.train_step().lower(setup.factory.create(0), batch).compile()  # its own jit: its own lowering
        assert REDUCE_PRECISION_HLO in reference.as_text()
        compiled = compile_train_step(setup.train_step(), setup.factory.create(0), batch)
        assert REDUCE_PRECISION_HLO not in compiled.as_text()
        monkeypatch.setenv("LMJAX_STABLEHLO_REWRITE", "off")  # the switch that benchmarks compare against
        assert REDUCE_PRECISION_HLO in compile_train_step(setup.train_step(), setup.factory.create(0), batch).as_text()
        states = [setup.factory.create(0), setup.factory.create(0)]
        for _ in range(3):
            states[0], metrics = reference(states[0], batch)
            states[1], metrics_rewritten = compiled(states[1], batch)
            np.testing.assert_array_equal(metrics_rewritten["loss"], metrics["loss"])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(states[1].params), jax.device_get(states[0].params))
