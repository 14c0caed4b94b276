"""Train state, its sharded initialisation, and the jitted train / eval steps.

At the jit boundary the state is a plain pytree (`TrainState`): the step is a pure function
`(state, batch) -> (state, metrics)` compiled once with explicit in/out shardings and the state
donated, so parameters and optimizer moments are updated in place on every device. What the loss
is, and what a batch holds, is the task's business (`lmjax.tasks`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lmjax import sharding
from lmjax.config import Config
from lmjax.host_memory import release_free_heap
from lmjax.switches import switched_off
from lmjax.models import build_model
from lmjax.tasks import Task, build_task
from lmjax.train.optim import make_optimizer
from lmjax.train.stablehlo_rewrite import drop_identity_reduce_precision


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    frozen: Any  # the task's frozen state (e.g. a DPO reference model): never updated; {} when none


def init_params(cfg: Config, model: nn.Module, rng: jax.Array) -> Any:
    """Freshly initialised parameters, with their logical-axis boxes."""
    return model.init(rng, *model.example_inputs(1, cfg.data.seq_len))["params"]


def abstract_params(cfg: Config, model: nn.Module) -> Any:
    """Parameter shapes with their logical-axis boxes, without allocating anything."""
    return jax.eval_shape(lambda rng: init_params(cfg, model, rng), jax.random.key(0))


class StateFactory:
    """Creates the sharded TrainState, its shardings and its abstract (shape-only) version."""

    def __init__(self, cfg: Config, model: nn.Module, task: Task, mesh: Mesh, rules):
        self.cfg, self.model, self.task, self.mesh = cfg, model, task, mesh
        boxed_params, boxed_frozen = jax.eval_shape(self._init_boxed, jax.random.key(0))
        self.tx = make_optimizer(cfg, boxed_params)
        param_shardings = sharding.logical_to_sharding(nn.get_partition_spec(boxed_params), mesh, rules)
        frozen_shardings = sharding.logical_to_sharding(nn.get_partition_spec(boxed_frozen), mesh, rules)
        params, frozen = nn.unbox(boxed_params), nn.unbox(boxed_frozen)
        sharding.check_divisible(params, param_shardings)
        sharding.check_divisible(frozen, frozen_shardings, what="frozen state")
        replicated = NamedSharding(mesh, P())
        opt_abstract = jax.eval_shape(self.tx.init, params)
        # Optimizer moments mirror the parameters and take their shardings; counters replicate.
        opt_shardings = optax.tree_map_params(
            self.tx, lambda _, s: s, opt_abstract, param_shardings, transform_non_params=lambda _: replicated
        )
        self.shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings, frozen=frozen_shardings)

    def _init_boxed(self, rng: jax.Array) -> tuple[Any, Any]:
        """(params, frozen state) with their logical-axis boxes."""
        params = init_params(self.cfg, self.model, rng)
        return params, self.task.init_frozen(jax.random.fold_in(rng, 1), params)

    def _init(self, rng: jax.Array, params: Any = None) -> TrainState:
        """A fresh state; with `params` (unboxed, e.g. read by `train.init_from`) in place of new ones,
        and the task's frozen state made from them."""
        if params is None:
            boxed_params, boxed_frozen = self._init_boxed(rng)
        else:
            boxes = abstract_params(self.cfg, self.model)
            boxed_params = jax.tree.map(
                lambda box, value: box.replace_boxed(value) if isinstance(box, nn.LogicallyPartitioned) else value,
                boxes, params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned),
            )
            boxed_frozen = self.task.init_frozen(jax.random.fold_in(rng, 1), boxed_params)
        params, frozen = nn.unbox((boxed_params, boxed_frozen))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params), frozen=frozen)

    def create(self, seed: int, params: Any = None) -> TrainState:
        """Parameters are created already sharded: no device ever holds a full copy. `params`
        (sharded like the state's) start the run instead of freshly initialised ones; the
        optimizer and step start fresh."""
        init = jax.jit(self._init, out_shardings=self.shardings, donate_argnums=1)  # the given params are not kept twice
        return init(jax.random.key(seed), params)

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


def stop_flags_sharding(mesh: Mesh) -> NamedSharding:
    """One element per device: each process writes its own stop flag into the devices it owns."""
    return NamedSharding(mesh, P(tuple(mesh.axis_names)))


def make_stop_vote(mesh: Mesh):
    """jitted flags -> their max, replicated: the signal any process received, known to all."""
    return jax.jit(jnp.max, in_shardings=stop_flags_sharding(mesh), out_shardings=NamedSharding(mesh, P()))


def make_stop_flags(mesh: Mesh, signum: int | None) -> jax.Array:
    """This process's pending signal (0 for none) as its part of the global [n_devices] flags."""
    value = np.full((1,), signum or 0, np.int32)
    return jax.make_array_from_callback((mesh.devices.size,), stop_flags_sharding(mesh), lambda _: value)


def _accumulate_over_microbatches(fn, batch, n_micro: int, batch_axes):
    """sum over the `n_micro` micro-batches of `fn(micro_batch)` (a pytree of arrays), one at a time:
    activations are only ever held for one micro-batch."""
    if n_micro == 1:
        return fn(batch)
    micro = _split_microbatches(batch, n_micro, batch_axes)
    shapes = jax.eval_shape(fn, jax.tree.map(lambda x: x[0], micro))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    total, _ = jax.lax.scan(lambda carry, mb: (jax.tree.map(jnp.add, carry, fn(mb)), None), zeros, micro)
    return total


def make_train_step(factory: StateFactory, batch_shardings: dict[str, NamedSharding]):
    model, task, tx, n_micro = factory.model, factory.task, factory.tx, factory.cfg.train.microbatches
    batch_axes = next(iter(batch_shardings.values())).spec[0]

    def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        value_and_grad = jax.value_and_grad(lambda p, b: task.loss(p, state.frozen, b, model), has_aux=True)

        def grad_fn(b):
            (_, sums), grads = value_and_grad(state.params, b)
            return grads, sums

        # Tasks return sums; one division by the global normaliser (target tokens, pairs) makes
        # the gradient independent of how the batch was split over devices and micro-batches.
        grads, sums = _accumulate_over_microbatches(grad_fn, batch, n_micro, batch_axes)
        count = jnp.maximum(sums[task.normalizer], 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**task.train_metrics(sums), "grad_norm": grad_norm, "param_norm": optax.tree.norm(params)}
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, frozen=state.frozen)
        return new_state, metrics

    replicated = NamedSharding(factory.mesh, P())
    return jax.jit(
        step,
        in_shardings=(factory.shardings, batch_shardings),
        out_shardings=(factory.shardings, replicated),
        donate_argnums=0,
    )


def compile_train_step(train_step, state: TrainState, batch: dict[str, jax.Array]):
    """`train_step` (from `make_train_step`) compiled ahead of time for this state and batch's
    shapes and shardings, which every later step repeats. The compiler's freed memory is handed
    back to the OS before the step first runs (`release_free_heap`), so that it is not counted
    again under every step's temporaries: -240 MiB of peak RSS on configs/bench_cpu.yaml. On the
    CPU, checkpointing's float32 identity roundings are dropped first (`stablehlo_rewrite`;
    LMJAX_STABLEHLO_REWRITE=off compiles the program as jax lowers it)."""
    lowered = train_step.lower(state, batch)
    if jax.default_backend() == "cpu" and not switched_off("LMJAX_STABLEHLO_REWRITE"):
        # In place, on the module compile() reads (jax's cached lowering of this function: the
        # rewrite changes no value, so whoever lowers it again gets an equal program).
        drop_identity_reduce_precision(lowered.compiler_ir("stablehlo"))
    compiled = lowered.compile()
    release_free_heap()
    return compiled


def make_eval_step(factory: StateFactory, batch_shardings: dict[str, NamedSharding]):
    """jitted (params, frozen, batch, constants) -> the task's eval sums (replicated), computed
    micro-batch by micro-batch like training (`train.microbatches`), so evaluation never holds
    more activations or logits than a training micro-batch does."""
    replicated = NamedSharding(factory.mesh, P())
    n_micro = factory.cfg.train.microbatches
    batch_axes = next(iter(batch_shardings.values())).spec[0]

    def step(params, frozen, batch, constants):
        sums = lambda b: factory.task.eval_sums(params, frozen, b, factory.model, constants)  # noqa: E731
        return _accumulate_over_microbatches(sums, batch, n_micro, batch_axes)

    shardings = factory.shardings
    return jax.jit(step, in_shardings=(shardings.params, shardings.frozen, batch_shardings, replicated), out_shardings=replicated)


@dataclasses.dataclass
class ModelSetup:
    """What every command that runs a model on the mesh builds first, in one place."""

    cfg: Config
    mesh: Mesh
    rules: tuple
    task: Task
    model: nn.Module
    factory: StateFactory
    batch_shardings: dict[str, NamedSharding]

    @classmethod
    def build(cls, cfg: Config, devices: list | None = None, task: Task | None = None) -> ModelSetup:
        """Mesh and shape checks come first, before any data is read or anything compiles."""
        mesh = sharding.make_mesh(cfg, devices)
        rules = sharding.axis_rules(cfg)
        task = task if task is not None else build_task(cfg)
        model = build_model(cfg.model)
        factory = StateFactory(cfg, model, task, mesh, rules)
        shardings = sharding.batch_shardings(mesh, rules, task.batch_schema(cfg.data.global_batch_size))
        return cls(cfg, mesh, rules, task, model, factory, shardings)

    def global_batch(self, host_batch: dict) -> dict[str, jax.Array]:
        return sharding.host_batch_to_global(host_batch, self.batch_shardings)

    def train_step(self):
        return make_train_step(self.factory, self.batch_shardings)

    def eval_step(self):
        return make_eval_step(self.factory, self.batch_shardings)
