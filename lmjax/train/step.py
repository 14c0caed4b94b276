"""Train state, its sharded initialisation, and the jitted train / eval steps.

At the jit boundary the state is a plain pytree (`TrainState`): the step is a pure function
`(state, batch) -> (state, metrics)` compiled once with explicit in/out shardings and the state
donated, so parameters and optimizer moments are updated in place on every device.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lmjax import sharding
from lmjax.config import Config
from lmjax.objectives import OBJECTIVES, eval_sums
from lmjax.train.optim import make_optimizer


# Sums every objective returns; the step turns them into loss, z_loss and target_tokens.
STEP_SUMS = ("loss_sum", "z_loss_sum", "tokens")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def abstract_params(cfg: Config, model: nn.Module) -> Any:
    """Parameter shapes with their logical-axis boxes, without allocating anything."""
    tokens = jnp.zeros((1, cfg.data.seq_len), jnp.int32)
    return jax.eval_shape(lambda rng: model.init(rng, tokens)["params"], jax.random.key(0))


class StateFactory:
    """Creates the sharded TrainState, its shardings and its abstract (shape-only) version."""

    def __init__(self, cfg: Config, model: nn.Module, mesh: Mesh, rules):
        self.cfg, self.model, self.mesh = cfg, model, mesh
        boxed = abstract_params(cfg, model)
        self.tx = make_optimizer(cfg, boxed)
        param_shardings = sharding.logical_to_sharding(nn.get_partition_spec(boxed), mesh, rules)
        params = nn.unbox(boxed)
        sharding.check_divisible(params, param_shardings)
        replicated = NamedSharding(mesh, P())
        opt_abstract = jax.eval_shape(self.tx.init, params)
        # Optimizer moments mirror the parameters and take their shardings; counters replicate.
        opt_shardings = optax.tree_map_params(
            self.tx, lambda _, s: s, opt_abstract, param_shardings, transform_non_params=lambda _: replicated
        )
        self.shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings)
        self.param_shapes = params

    def _init(self, rng: jax.Array) -> TrainState:
        tokens = jnp.zeros((1, self.cfg.data.seq_len), jnp.int32)
        params = nn.unbox(self.model.init(rng, tokens)["params"])
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params))

    def create(self, seed: int) -> TrainState:
        """Parameters are created already sharded: no device ever holds a full copy."""
        init = jax.jit(self._init, out_shardings=self.shardings)
        return init(jax.random.key(seed))

    def abstract(self) -> TrainState:
        shapes = jax.eval_shape(self._init, jax.random.key(0))
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, self.shardings)


def _split_microbatches(batch: dict[str, jax.Array], n: int, batch_axes) -> dict[str, jax.Array]:
    """[B, ...] -> [n, B/n, ...] taking rows i*n + m for micro-batch m, so every device keeps
    its contiguous shard of rows and each micro-batch stays spread over all data-parallel devices."""

    def split(x):
        x = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, P(None, batch_axes, *([None] * (x.ndim - 2))))

    return jax.tree.map(split, batch)


def make_train_step(cfg: Config, model: nn.Module, factory: StateFactory, batch_sharding: NamedSharding):
    objective = functools.partial(OBJECTIVES[cfg.train.objective], model=model, z_loss=cfg.train.z_loss)
    n_micro = cfg.train.microbatches
    tx = factory.tx
    grad_fn = jax.value_and_grad(lambda p, b: objective(p, b), has_aux=True)

    def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        if n_micro == 1:
            (_, sums), grads = grad_fn(state.params, batch)
        else:
            micro = _split_microbatches(batch, n_micro, batch_sharding.spec[0])

            def accumulate(carry, mb):
                (_, s), g = grad_fn(state.params, mb)
                return jax.tree.map(jnp.add, carry, (g, s)), None

            (_, sums_shape), grads_shape = jax.eval_shape(grad_fn, state.params, jax.tree.map(lambda x: x[0], micro))
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (grads_shape, sums_shape))
            (grads, sums), _ = jax.lax.scan(accumulate, zeros, micro)
        # Objectives return sums; one division by the global target-token count makes the
        # gradient independent of how the batch was split over devices and micro-batches.
        tokens = jnp.maximum(sums["tokens"], 1.0)
        grads = jax.tree.map(lambda g: g / tokens, grads)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": sums["loss_sum"] / tokens,
            "z_loss": sums["z_loss_sum"] / tokens,
            "grad_norm": grad_norm,
            "param_norm": optax.tree.norm(params),
            "target_tokens": sums["tokens"],
        }
        # Any other entry (e.g. `moe/...`) is a token-weighted sum: log its per-token average.
        metrics.update({name: value / tokens for name, value in sums.items() if name not in STEP_SUMS})
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    replicated = NamedSharding(factory.mesh, P())
    return jax.jit(
        step,
        in_shardings=(factory.shardings, batch_sharding),
        out_shardings=(factory.shardings, replicated),
        donate_argnums=0,
    )


def make_eval_step(model: nn.Module, factory: StateFactory, batch_sharding: NamedSharding):
    replicated = NamedSharding(factory.mesh, P())

    def step(params, batch, token_bytes):
        return eval_sums(params, batch, model, token_bytes)

    return jax.jit(step, in_shardings=(factory.shardings.params, batch_sharding, replicated), out_shardings=replicated)
