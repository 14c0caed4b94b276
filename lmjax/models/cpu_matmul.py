"""Float32 matmuls on the CPU through Intel MKL (`matmul_cpu.cc`), for `layers.Dense` and the fused
cross-entropy.

XLA:CPU's own matmul libraries reach ~80-85% of MKL's sgemm rate per core on a model's shapes, and
less on weight gradients; a train step is mostly matmuls, so this is most of what separates XLA:CPU
from a PyTorch peer on the same model (experiments/bench/README.md, fourteenth round).

`matmul(x, w)` is x @ w as one custom call each for the forward, the input gradient and the weight
gradient (`jax.custom_vjp`; MKL reads transposed operands in place), and `product` one such call for
code that writes its own gradients (the fused cross-entropy); both return None where it does not apply:
not float32, not compiling for the CPU, a mesh of several devices (XLA partitions its own dots over
a mesh; it cannot partition a custom call), `model.matmul: xla`, or MKL not installed (the optional
extra: `pip install 'lmjax[mkl]'`, x86-64 Linux). Callers then use XLA's dot.

The product is named `DENSE_OUT` for activation checkpointing: `model.remat: dots` saves it, as it
saves XLA's dots, so the backward does not run the forward's matmuls again.

The kernel is compiled on first use like the attention kernel (`cpu_kernels.register`), linked against
the MKL of the `mkl` wheel (sequential MKL: the kernel splits each product over XLA's own threads).
"""

from __future__ import annotations

import functools
import importlib.metadata
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from lmjax import sharding
from lmjax.models.cpu_kernels import KernelBuildError, register

SOURCE = Path(__file__).with_name("matmul_cpu.cc")
TARGET = "lmjax_matmul_cpu"
DENSE_OUT = "dense_out"  # checkpoint name of the forward product
# MKL's sequential link line: LP64 interface, sequential threading, core.
MKL_LIBRARIES = ("libmkl_intel_lp64.so", "libmkl_sequential.so", "libmkl_core.so")


def mkl_library_dir() -> Path | None:
    """The folder of the installed `mkl` wheel's shared libraries, or None without one."""
    try:
        files = importlib.metadata.files("mkl") or ()
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name.startswith("libmkl_sequential.so"):
            return Path(file.locate()).resolve().parent
    return None


def _link_arguments(folder: Path) -> tuple[str, ...]:
    """-l options for MKL_LIBRARIES by their versioned file names (the wheel ships libmkl_core.so.N,
    no unversioned link), with the folder on the library's run path."""
    names = []
    for stem in MKL_LIBRARIES:
        found = sorted(p.name for p in folder.glob(f"{stem}*"))
        if not found:
            raise KernelBuildError(f"MKL in {folder} has no {stem}*")
        names.append(f"-l:{found[0]}")
    return (f"-L{folder}", *names, f"-Wl,-rpath,{folder}")


@functools.cache
def available() -> bool:
    """Whether the MKL matmul is registered. False without the `mkl` package (silently: it is an
    optional extra) or when the kernel cannot be built (with a warning naming why)."""
    folder = mkl_library_dir()
    if folder is None:
        return False
    try:
        register(SOURCE, {TARGET: "LmjaxMatmul"}, _link_arguments(folder))
    except (KernelBuildError, OSError, AttributeError) as e:
        warnings.warn(f"lmjax: the MKL matmul kernel is unavailable, using XLA's matmuls: {e}", stacklevel=2)
        return False
    return True


def _product(a: jax.Array, b: jax.Array, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    """op(a) @ op(b), op transposing where asked."""
    m = a.shape[1] if trans_a else a.shape[0]
    n = b.shape[0] if trans_b else b.shape[1]
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((m, n), jnp.float32), vmap_method="sequential")
    return call(a, b, trans_a=trans_a, trans_b=trans_b)


@jax.custom_vjp
def _matmul(x_MK: jax.Array, w_KN: jax.Array) -> jax.Array:
    return _product(x_MK, w_KN)


def _matmul_fwd(x_MK, w_KN):
    return checkpoint_name(_product(x_MK, w_KN), DENSE_OUT), (x_MK, w_KN)


def _matmul_bwd(residuals, dy_MN):
    x_MK, w_KN = residuals
    dy_MN = dy_MN.astype(jnp.float32)
    return _product(dy_MN, w_KN, trans_b=True), _product(x_MK, dy_MN, trans_a=True)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def applies(*operands: jax.Array) -> bool:
    """Whether the MKL kernel runs for these operands here (see the module docstring)."""
    if any(x.dtype != jnp.float32 or x.ndim != 2 for x in operands):
        return False
    if jax.default_backend() != "cpu":
        return False
    return sharding.whole_arrays() and available()


def matmul(x_MK: jax.Array, w_KN: jax.Array) -> jax.Array | None:
    """x @ w [M, N] through MKL, differentiable, or None where the kernel does not apply (the caller
    then uses XLA's dot)."""
    return _matmul(x_MK, w_KN) if applies(x_MK, w_KN) else None


def product(a: jax.Array, b: jax.Array, *, trans_a: bool = False, trans_b: bool = False) -> jax.Array | None:
    """op(a) @ op(b) through MKL, op transposing where asked, for code that writes its own gradients
    (no VJP; the fused cross-entropy's); None where the kernel does not apply."""
    return _product(a, b, trans_a, trans_b) if applies(a, b) else None


def calls_in(hlo_text: str) -> int:
    """How many of the kernel's calls a compiled or lowered program's text holds."""
    return hlo_text.count(f'custom_call_target="{TARGET}"') + hlo_text.count(f"@{TARGET}(")
