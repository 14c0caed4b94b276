"""Native CPU kernels (XLA FFI), compiled on first use for the machine they run on.

`attention_cpu.cc` is FlashAttention-2 for XLA:CPU in float32: the pure-JAX blockwise attention
(flash_attention.py) cannot keep a tile's scores in cache between its matmuls and softmax, because
XLA:CPU does not fuse a matmul with the element-wise work around it. The source is compiled with
the system C++ compiler (`$CXX`, else g++) against jaxlib's FFI headers, with `-march=native`, into
`~/.cache/lmjax/kernels/<key>/` (`LMJAX_KERNEL_CACHE` replaces `~/.cache/lmjax`), keyed by the source,
the flags, jaxlib's version and the CPU's instruction-set flags, and published atomically
(lmjax.data.cache), so concurrent processes build it at most once each and never load half a file.

Without a compiler the build fails once, with a warning naming the cause, and callers fall back to
the pure-JAX path (`available()` is False).
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import shutil
import subprocess
import warnings
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from lmjax import sharding
from lmjax.data.cache import cache_key, cached_folder, file_sha256

SOURCE = Path(__file__).with_name("attention_cpu.cc")
FORWARD_TARGET, BACKWARD_TARGET = "lmjax_attention_cpu_forward", "lmjax_attention_cpu_backward"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno")


class KernelBuildError(RuntimeError):
    pass


def _cpu_flags() -> str:
    """The instruction-set flags of this CPU (what -march=native compiles for)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _compiler() -> str:
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise KernelBuildError(f"no C++ compiler: {cxx!r} is not on PATH (set CXX or install g++)")
    return cxx


def build(source: Path = SOURCE, link: tuple[str, ...] = ()) -> Path:
    """The shared library compiled from `source` (linked with `link`), built now if this machine has
    none cached."""
    cxx = _compiler()
    include = jax.ffi.include_dir()
    headers = {h.name: file_sha256(h) for h in sorted(source.parent.glob("*.h"))}  # what the sources include
    key = cache_key(source=file_sha256(source), headers=headers, flags=FLAGS, link=link, cxx=cxx, jaxlib=jaxlib.__version__,
                    cpu=_cpu_flags())
    library = f"{source.stem}.so"

    def compile_into(folder: Path) -> None:
        cmd = [cxx, *FLAGS, f"-I{include}", str(source), "-o", str(folder / library), *link]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise KernelBuildError(f"{' '.join(cmd)} failed: {result.stderr.strip()[-2000:]}")

    cache = os.environ.get("LMJAX_KERNEL_CACHE", "~/.cache/lmjax")
    folder, _ = cached_folder(cache, "kernels", key, compile_into)
    return folder / library


def register(source: Path, targets: dict[str, str], link: tuple[str, ...] = ()) -> None:
    """Builds `source` (if needed), loads it and registers each FFI target name -> handler symbol for the CPU."""
    library = ctypes.cdll.LoadLibrary(str(build(source, link)))
    for target, symbol in targets.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")


@functools.cache
def _load() -> bool:
    """The attention kernel's targets, registered once per process."""
    register(SOURCE, {FORWARD_TARGET: "LmjaxAttentionForward", BACKWARD_TARGET: "LmjaxAttentionBackward"})
    return True


@functools.cache
def available() -> bool:
    """Whether the CPU attention kernel is registered; warns once (naming why) when it cannot be."""
    try:
        return _load()
    except (KernelBuildError, OSError, AttributeError) as e:
        warnings.warn(f"lmjax: the native CPU attention kernel is unavailable, using the pure-JAX blockwise path: {e}",
                      stacklevel=2)
        return False


# --- attention -------------------------------------------------------------------------------------

# Tile sizes of the kernel (query rows x key columns). Measured on a 2-vCPU AVX-512 Xeon at B*T = 4,096,
# N = 6, H = 64 (experiments/bench/README.md, twelfth round).
BLOCK_Q, BLOCK_K = 96, 128


def _ffi_attributes(causal: bool, scale: float, local_window: int | None, has_segments: bool, has_rope: bool) -> dict:
    return dict(causal=causal, scale=np.float32(scale), window=np.int64(local_window or 0), has_segments=has_segments,
                has_rope=has_rope, block_q=np.int64(BLOCK_Q), block_k=np.int64(BLOCK_K))


def _optional_operands(segment_ids_BT: jax.Array | None, rope_cos_BTh: jax.Array | None, rope_sin_BTh: jax.Array | None):
    """The kernel's segment ids and RoPE tables, with small dummies for the absent ones, and the flags."""
    seg = jnp.zeros((1, 1), jnp.int32) if segment_ids_BT is None else segment_ids_BT.astype(jnp.int32)
    has_rope = rope_cos_BTh is not None
    cos, sin = (x.astype(jnp.float32) for x in (rope_cos_BTh, rope_sin_BTh)) if has_rope else (jnp.zeros((1, 1, 1), jnp.float32),) * 2
    return (seg, cos, sin), dict(has_segments=segment_ids_BT is not None, has_rope=has_rope)


def _forward(static, q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, rope_cos_BTh, rope_sin_BTh):
    B, T, N, _ = q_BTNH.shape
    out_types = (jax.ShapeDtypeStruct(q_BTNH.shape, jnp.float32), jax.ShapeDtypeStruct((B, N, T), jnp.float32))
    call = jax.ffi.ffi_call(FORWARD_TARGET, out_types, vmap_method="sequential")
    optional, flags = _optional_operands(segment_ids_BT, rope_cos_BTh, rope_sin_BTh)
    return call(q_BTNH, k_BSKH, v_BSKH, *optional, **_ffi_attributes(*static, **flags))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(static, q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, rope_cos_BTh, rope_sin_BTh):
    return _forward(static, q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, rope_cos_BTh, rope_sin_BTh)[0]


def _attention_fwd(static, q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, rope_cos_BTh, rope_sin_BTh):
    from lmjax.models.flash_attention import ATTENTION_LSE, ATTENTION_OUT

    out_BTNH, lse_BNT = _forward(static, q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, rope_cos_BTh, rope_sin_BTh)
    # The names blockwise attention's residuals have, so `model.remat: dots` keeps these too.
    out_BTNH, lse_BNT = checkpoint_name(out_BTNH, ATTENTION_OUT), checkpoint_name(lse_BNT, ATTENTION_LSE)
    return out_BTNH, (q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, rope_cos_BTh, rope_sin_BTh, out_BTNH, lse_BNT)


def _attention_bwd(static, residuals, dout_BTNH):
    q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, rope_cos_BTh, rope_sin_BTh, out_BTNH, lse_BNT = residuals
    out_types = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q_BTNH, k_BSKH, v_BSKH))
    call = jax.ffi.ffi_call(BACKWARD_TARGET, out_types, vmap_method="sequential")
    optional, flags = _optional_operands(segment_ids_BT, rope_cos_BTh, rope_sin_BTh)
    dq, dk, dv = call(q_BTNH, k_BSKH, v_BSKH, *optional, out_BTNH, lse_BNT, dout_BTNH.astype(jnp.float32),
                      **_ffi_attributes(*static, **flags))
    # No gradient for the segment ids and the RoPE tables (functions of integer positions).
    return dq, dk, dv, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, segment_ids_BT: jax.Array | None, *,
              causal: bool, scale: float, local_window: int | None,
              rope: tuple[jax.Array, jax.Array] | None = None) -> jax.Array | None:
    """The kernel's softmax(scale * q k^T + mask) v with `flash_attention.blockwise_attention`'s
    semantics and residuals (q and k first rotated by the `rope` tables, cos and sin [B, T, H/2]), or
    None where it does not apply: not float32, not compiling for the CPU, a mesh it cannot run per
    shard over (`sharding.run_per_shard`), or no compiler."""
    if any(x.dtype != jnp.float32 for x in (q_BTNH, k_BSKH, v_BSKH)) or jax.default_backend() != "cpu":
        return None
    # Under a mesh, per shard: batch and heads may be split, query and KV heads alike (a shard keeps
    # whole GQA groups); a split sequence or head_dim is left to the XLA ops.
    q_axes, kv_axes = ("batch", "length", "heads", "head_dim"), ("batch", "length", "kv_heads", "head_dim")
    heads_split = sharding.splits("heads") or sharding.splits("kv_heads")
    if heads_split and nn.logical_to_mesh_axes(("heads",)) != nn.logical_to_mesh_axes(("kv_heads",)):
        return None
    optional = {"segment_ids_BT": (segment_ids_BT, ("batch", "length")),
                "rope_cos_BTh": (None if rope is None else rope[0], ("batch", "length", None)),
                "rope_sin_BTh": (None if rope is None else rope[1], ("batch", "length", None))}
    present = [name for name, (x, _) in optional.items() if x is not None]

    def fn(q, k, v, *given):  # shard_map takes arrays only: the absent operands are bound as None here
        kwargs = dict.fromkeys(optional) | dict(zip(present, given))
        return _attention((causal, float(scale), local_window), q, k, v, **kwargs)

    if not available():
        return None
    args = (q_BTNH, k_BSKH, v_BSKH, *(optional[name][0] for name in present))
    return sharding.run_per_shard(fn, args, (q_axes, kv_axes, kv_axes, *(optional[name][1] for name in present)), q_axes,
                                  whole=("length", "head_dim"))
