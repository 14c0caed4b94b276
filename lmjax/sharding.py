"""Device mesh and logical-axis sharding.

Model code names logical axes only (`batch`, `embed`, `heads`, ...); the rules table in
`cfg.mesh.rules` maps them to the mesh axes (data, fsdp, tensor, expert). A new topology is a
config change: the same model runs on 1 CPU, 8 fake CPU devices, a GPU node or a pod.
"""

from __future__ import annotations

import contextlib
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from lmjax.config import MESH_AXES, Config, ConfigError, resolve_mesh_shape


def use_cpu_devices(cfg: Config) -> None:
    """Gives JAX's CPU backend `cfg.mesh.cpu_devices` devices, before its backends start (`make_mesh`
    calls it: in the lmjax commands the mesh is the first thing that needs a device); once they
    have, a CPU backend with another count is a ConfigError (too late to change, and a mesh over
    other devices than the config asked for). Unset, or a GPU/TPU backend: nothing to do."""
    wanted = cfg.mesh.cpu_devices
    if wanted is None:
        return
    try:
        jax.config.update("jax_num_cpu_devices", wanted)
    except RuntimeError:  # the backends have started
        if jax.default_backend() == "cpu" and jax.local_device_count() != wanted:
            raise ConfigError(f"mesh.cpu_devices={wanted}, but JAX's CPU backend already started with {jax.local_device_count()} "
                              f"devices: set it before the process's first JAX computation (the lmjax commands do), or leave it null")


def make_mesh(cfg: Config, devices: list[jax.Device] | None = None) -> Mesh:
    """Mesh over `devices` (default: all, `cfg.mesh.cpu_devices` of them on a CPU) with the axis sizes
    of `cfg.mesh` (-1 filled in)."""
    if devices is None:
        use_cpu_devices(cfg)
    devices = list(devices if devices is not None else jax.devices())
    sizes = resolve_mesh_shape(cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    # Auto axes: XLA's partitioner propagates shardings from the annotated inputs, outputs and
    # logical constraints (the GSPMD model the rules table is written for).
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if devices == list(jax.devices()):
        # jax.make_mesh orders devices for the physical topology (ICI rings on TPU, NVLink on GPU).
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def axis_rules(cfg: Config) -> tuple[tuple[str, Any], ...]:
    return tuple((name, tuple(t) if isinstance(t, list) else t) for name, t in cfg.mesh.rules)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: tuple[tuple[str, Any], ...]):
    """Mesh + rules in scope, so `nn.with_logical_constraint` inside the model takes effect."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def logical_to_sharding(logical_specs: Any, mesh: Mesh, rules) -> Any:
    """Tree of logical PartitionSpecs -> tree of NamedShardings."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def batch_spec(rules) -> P:
    """PartitionSpec of a [batch, length] input array."""
    return nn.logical_to_mesh_axes(("batch", "length"), rules)


def batch_shardings(mesh: Mesh, rules, schema: dict[str, Any]) -> dict[str, NamedSharding]:
    """One sharding per batch key (`schema`: key -> array or ShapeDtypeStruct): the leading
    dimension over the batch axes, the others replicated."""
    batch_axes = batch_spec(rules)[0]
    return {key: NamedSharding(mesh, P(batch_axes, *([None] * (len(x.shape) - 1)))) for key, x in schema.items()}


def devices_along(mesh, mesh_axes) -> int:
    """How many devices a dimension sharded over `mesh_axes` (a PartitionSpec entry: None, a mesh axis
    name or a tuple of them) is split across."""
    names = (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes or ()
    return int(np.prod([mesh.shape[a] for a in names]))


def check_divisible(abstract_tree: Any, shardings: Any, what: str = "parameter") -> None:
    """Every sharded dimension must divide evenly over its mesh axes; name the first that does not."""
    leaves = jax.tree_util.tree_leaves_with_path(abstract_tree)
    shard_leaves = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, leaf), sharding in zip(leaves, shard_leaves):
        for dim, axes in zip(leaf.shape, sharding.spec):
            if axes is None:
                continue
            axes = axes if isinstance(axes, tuple) else (axes,)
            n = devices_along(sharding.mesh, axes)
            if dim % n:
                name = jax.tree_util.keystr(path)
                raise ConfigError(
                    f"{what} {name} of shape {tuple(leaf.shape)}: dimension {dim} does not divide over mesh axes "
                    f"{'x'.join(axes)} = {n}; change the model size or the mesh"
                )


def host_batch_to_global(batch: dict[str, np.ndarray], shardings: dict[str, NamedSharding]) -> dict[str, jax.Array]:
    """Host-local numpy rows -> one global jax.Array per key, sharded as `batch_shardings` says."""
    unexpected = sorted(set(batch) ^ set(shardings))
    if unexpected:
        raise ValueError(f"batch keys {sorted(batch)} do not match the task's batch schema {sorted(shardings)}")
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in batch.items()}


def whole_arrays() -> bool:
    """Whether code traced here sees whole arrays: no mesh, a mesh of one device, or inside a
    shard_map over every mesh axis (where a custom call needs no partitioning)."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or mesh.size == 1 or mesh.are_all_axes_manual


def run_per_shard(fn, args: tuple[jax.Array, ...], logical_axes: tuple[tuple[str | None, ...], ...],
                  out_axes: tuple[str | None, ...], *, whole: tuple[str, ...] = ()):
    """`fn(*args)` run on each device's shard (jax.shard_map) under the active mesh and logical-axis
    rules, `logical_axes` naming each argument's dimensions and `out_axes` the output's: for
    computations XLA's partitioner cannot split itself (a custom call). Without a mesh, on one device
    or inside a shard_map over every mesh axis, `fn(*args)` itself. None, with nothing run, where the
    rules split a logical axis of `whole`, an argument does not split evenly (shard_map does not pad),
    or only some mesh axes are manual."""
    if whole_arrays():
        return fn(*args)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.manual_axes:
        return None
    specs = [nn.logical_to_mesh_axes(axes) for axes in logical_axes]
    if any(spec[d] for axes, spec in zip(logical_axes, specs) for d, name in enumerate(axes) if name in whole):
        return None

    if any(size % devices_along(mesh, mesh_axes) for x, spec in zip(args, specs) for size, mesh_axes in zip(x.shape, spec)):
        return None
    return jax.shard_map(fn, mesh=mesh, in_specs=tuple(specs), out_specs=nn.logical_to_mesh_axes(out_axes),
                         check_vma=False)(*args)


def splits(logical_axis: str) -> bool:
    """Whether the active mesh and logical-axis rules split `logical_axis` over more than one device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return False
    return devices_along(mesh, nn.logical_to_mesh_axes((logical_axis,))[0]) > 1
