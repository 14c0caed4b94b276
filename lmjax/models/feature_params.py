"""A per-feature parameter applied to every token (a bias, a norm's scale), with its gradient summed
over the tokens as a matrix-vector product.

The gradient of a [F] parameter broadcast over [..., F] activations is a sum over every leading
axis: a column reduction. XLA:CPU lowers a large reduction to a windowed reduction (its
tree-reduction rewrite) that runs ~15x slower than a matrix-vector product over the same data
(column sum of [4096, 1536] float32: 15 ms against 0.9 ms for `ones @ g`), and without the rewrite
slower still. In a profile of the GPT-2 bench step, reductions took ~8% of the step, the largest
of them the gradient of the 1,536-wide MLP bias (experiments/bench/README.md).

`ones[N] @ g[N, F]` runs as one Eigen GEMV on CPU and as a reduction-shaped matmul elsewhere;
under a mesh GSPMD partitions it like the reduction (partial sums over the sharded token axes,
then an all-reduce). Float32 accumulation whatever the dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sum_over_tokens(g: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """[..., F] -> [F] in `dtype`: the sum over every leading axis, as `ones @ g` (float32 accumulation)."""
    g_NF = g.reshape(-1, g.shape[-1])
    ones_N = jnp.ones((g_NF.shape[0],), g_NF.dtype)
    return jnp.matmul(ones_N, g_NF, preferred_element_type=jnp.float32).astype(dtype)


@jax.custom_vjp
def add_bias(y: jax.Array, bias_F: jax.Array) -> jax.Array:
    """y + bias over the last axis (y's dtype); d bias = sum_over_tokens(d y)."""
    return y + bias_F.astype(y.dtype)


def _add_bias_fwd(y, bias_F):
    return add_bias(y, bias_F), bias_F  # kept for its dtype ([F]: nothing of the activations' size)


def _add_bias_bwd(bias_F, g):
    return g, sum_over_tokens(g, bias_F.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


@jax.custom_vjp
def scale_features(x: jax.Array, scale_F: jax.Array) -> jax.Array:
    """x * scale over the last axis (x's dtype; a norm's gain); d scale = sum_over_tokens(d y * x)."""
    return x * scale_F.astype(x.dtype)


def _scale_features_fwd(x, scale_F):
    return scale_features(x, scale_F), (x, scale_F)


def _scale_features_bwd(residuals, g):
    x, scale_F = residuals
    return g * scale_F.astype(g.dtype), sum_over_tokens(g * x, scale_F.dtype)


scale_features.defvjp(_scale_features_fwd, _scale_features_bwd)
