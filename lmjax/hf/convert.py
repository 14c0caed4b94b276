"""Hugging Face weights <-> lmjax parameters, streamed one tensor at a time.

Import: every lmjax parameter is assembled from the shards its sharding puts on this host's
devices (`jax.make_array_from_single_device_arrays`). A stacked parameter is read layer by layer:
each layer's Hugging Face tensors are read once, transformed (`lmjax.hf.weights`) and copied into
the shards that hold it. Host memory holds this host's part of one parameter plus one layer, never
the whole model: a model larger than one host converts on a mesh, each host reading what its
devices hold. The files are checked first (every tensor present, none extra, every shape right),
so a mismatched checkpoint is refused before anything is loaded.

Export: link by link, each lmjax parameter's layer is fetched to the host (gathered across hosts),
transformed and handed to the shard writer, which keeps one output shard in memory at a time.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils

from lmjax.config import ModelConfig
from lmjax.errors import CheckpointError
from lmjax.hf.configs import HFConfigError, t5_scales_output
from lmjax.hf.safetensors_io import SafetensorsCheckpoint
from lmjax.hf.weights import Link, ignored, links_for, locate

# Host bytes of transformed per-layer tensors kept while the devices of one parameter read them.
LAYER_CACHE_BYTES = 2 * 1024**3
FLOAT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}


def _flat(tree: Any) -> dict[str, Any]:
    return traverse_util.flatten_dict(nn.unbox(tree), sep="/")


def _zeros_view(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A read-only array of `shape` using no memory: shapes flow through a link's transforms for free."""
    return np.broadcast_to(np.zeros((), dtype), shape)


class _Plan:
    """The links of a model, indexed by the lmjax parameter (and layer) each output lands in."""

    def __init__(self, links: list[Link], model: ModelConfig, abstract: dict[str, Any]):
        self.links, self.abstract, self.model = links, abstract, model
        self.sources: dict[str, dict[int | None, tuple[Link, int]]] = {}
        for link in links:
            for k, path in enumerate(link.lmjax):
                leaf, layer = locate(path, model)
                if leaf not in abstract:
                    raise HFConfigError(f"internal: the {model.family} model has no parameter {leaf} (from {path})")
                self.sources.setdefault(leaf, {})[layer] = (link, k)
        missing = sorted(set(abstract) - set(self.sources))
        if missing:
            raise HFConfigError(f"the lmjax model has parameters no Hugging Face tensor holds: {', '.join(missing[:3])}")

    def layer_shape(self, path: str) -> tuple[int, ...]:
        leaf, layer = locate(path, self.model)
        shape = self.abstract[leaf].shape
        return shape[1:] if layer is not None else shape

    def hf_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes the Hugging Face tensors must have: the lmjax shapes sent through `to_hf`."""
        shapes = {}
        for link in self.links:
            outs = link.to_hf(*(_zeros_view(self.layer_shape(p), np.float32) for p in link.lmjax))
            shapes.update({name: tuple(a.shape) for name, a in zip(link.hf, outs)})
        return shapes


def open_checked(hf_dir, model_type: str, model: ModelConfig, hf_config: dict, abstract_params: Any) -> tuple[SafetensorsCheckpoint, _Plan]:
    """The checkpoint of `hf_dir` and the plan reading it into `abstract_params`, after checking
    that the files hold exactly the tensors (and shapes) the model needs."""
    checkpoint = SafetensorsCheckpoint.open(hf_dir)
    try:
        names = set(checkpoint.names())
        links = links_for(model_type, model, names)
        plan = _Plan(links, model, _flat(abstract_params))
        expected = plan.hf_shapes()
        left_out = ignored(model_type, names, set(expected))
        checkpoint.check({**expected, **{n: checkpoint.shape(n) for n in left_out}}, optional=left_out)
        for name in expected:
            if checkpoint.dtype(name) not in FLOAT_DTYPES.values():
                raise CheckpointError(f"{checkpoint.directory}: tensor {name} is {checkpoint.dtype(name)}; expected float32, bfloat16 or float16 weights")
        if model_type == "t5" and model.tie_embeddings and "lm_head.weight" in names:
            # A rescaled (original T5) head that is not the shared table: lmjax ties the two.
            if not np.array_equal(checkpoint.read("lm_head.weight"), checkpoint.read("shared.weight")):
                raise HFConfigError(f"{checkpoint.directory}: lm_head.weight differs from shared.weight while the decoder output is rescaled "
                                    f"(scale_decoder_outputs={t5_scales_output(hf_config)}); lmjax's rescaled T5 head is the tied table")
    except BaseException:
        checkpoint.close()
        raise
    return checkpoint, plan


def source_dtype(checkpoint: SafetensorsCheckpoint, plan: _Plan) -> str:
    """The parameter dtype an import keeps: bfloat16 when every weight is, else float32 (float16
    and bfloat16 both widen to float32 exactly)."""
    dtypes = {checkpoint.dtype(name) for link in plan.links for name in link.hf}
    return "bfloat16" if dtypes == {FLOAT_DTYPES["bfloat16"]} else "float32"


class _LayerCache:
    """Transformed per-layer values of the link being read, least recently used out first."""

    def __init__(self, budget_bytes: int):
        self.budget, self.entries, self.size = budget_bytes, OrderedDict(), 0

    def get(self, key, compute: Callable[[], tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        value = compute()
        self.entries[key] = value
        self.size += sum(a.nbytes for a in value)
        while self.size > self.budget and len(self.entries) > 1:
            _, old = self.entries.popitem(last=False)
            self.size -= sum(a.nbytes for a in old)
        return value


def load_params(checkpoint: SafetensorsCheckpoint, plan: _Plan, abstract_params: Any) -> Any:
    """The parameters, each put shard by shard on the devices of this host that its sharding
    (from `abstract_params`) names. A stacked parameter is read layer by layer, each layer once per
    host, into the shards that hold it; host memory peaks at this host's part of one parameter."""
    cache = _LayerCache(LAYER_CACHE_BYTES)  # a fused link (GPT-2's c_attn) feeds several parameters

    def value(leaf: str, layer: int | None) -> np.ndarray:
        link, k = plan.sources[leaf][layer]
        return cache.get((id(link)), lambda: link.to_lmjax(*(checkpoint.read(name) for name in link.hf)))[k]

    def build(leaf: str, spec: jax.ShapeDtypeStruct) -> jax.Array:
        dtype, indices = np.dtype(spec.dtype), spec.sharding.addressable_devices_indices_map(spec.shape)
        if None in plan.sources[leaf]:
            whole = value(leaf, None)
            shards = {device: np.asarray(whole[index], dtype) for device, index in indices.items()}
        else:
            layers = {device: range(*index[0].indices(spec.shape[0])) for device, index in indices.items()}
            shards = {device: np.empty((len(layers[device]), *whole_shape(index[1:], spec.shape[1:])), dtype) for device, index in indices.items()}
            for layer in sorted(set().union(*layers.values())):
                per_layer = value(leaf, layer)
                for device, index in indices.items():
                    if layer in layers[device]:
                        shards[device][layers[device].index(layer)] = per_layer[index[1:]]
        arrays = [jax.device_put(shards[device], device) for device in indices]
        return jax.make_array_from_single_device_arrays(spec.shape, spec.sharding, arrays)

    flat = _flat(abstract_params)
    params = {leaf: build(leaf, spec) for leaf, spec in flat.items()}
    return traverse_util.unflatten_dict(params, sep="/")


def whole_shape(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of `array[index]` for an array of `shape` (slices with unit steps)."""
    return tuple(len(range(*i.indices(n))) for i, n in zip(index, shape))


def _host(array: jax.Array) -> np.ndarray:
    if array.is_fully_addressable:
        return np.asarray(jax.device_get(array))
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def export_tensors(model_type: str, model: ModelConfig, params: Any, dtype: str,
                   dtypes: dict[str, str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) of every Hugging Face tensor of `params`, one link at a time, in `dtype` (or
    the per-tensor `dtypes`, e.g. the ones an import came with). Refuses a model any of whose
    parameters no tensor would carry, before yielding anything."""
    flat, dtypes = _flat(params), dtypes or {}
    links = links_for(model_type, model)
    _Plan(links, model, flat)  # every parameter has its tensor: nothing is silently left out
    for link in links:
        arrays = []
        for path in link.lmjax:
            leaf, layer = locate(path, model)
            arrays.append(_host(flat[leaf] if layer is None else flat[leaf][layer]))
        for name, array in zip(link.hf, link.to_hf(*arrays)):
            yield name, np.ascontiguousarray(array.astype(FLOAT_DTYPES[dtypes.get(name, dtype)]))


def file_dtypes(checkpoint: SafetensorsCheckpoint, plan: _Plan) -> tuple[str, dict[str, str]]:
    """(the dtype most weights are stored in, the tensors stored otherwise): export writes them back alike."""
    names = [name for link in plan.links for name in link.hf]
    by_name = {name: _dtype_name(checkpoint.dtype(name)) for name in names}
    counts: dict[str, int] = {}
    for name in names:
        counts[by_name[name]] = counts.get(by_name[name], 0) + math.prod(checkpoint.shape(name))
    main = max(counts, key=counts.get)
    return main, {name: d for name, d in by_name.items() if d != main}


def _dtype_name(dtype: np.dtype) -> str:
    return next(name for name, d in FLOAT_DTYPES.items() if d == dtype)


def parameter_count(abstract_params: Any) -> int:
    return sum(math.prod(s.shape) for s in _flat(abstract_params).values())
