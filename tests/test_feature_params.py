"""Bias and norm-gain ops whose parameter gradient is a matrix-vector product: equal to the plain
broadcast ops in values and gradients (fp32 tight; bf16 activations with float32 parameters)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.models.feature_params import add_bias, scale_features, sum_over_tokens


def _inputs(dtype):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(k1, (3, 5, 7, 16), jnp.float32).astype(dtype)  # several leading axes
    p = jax.random.normal(k2, (16,), jnp.float32)
    g = jax.random.normal(k3, x.shape, jnp.float32).astype(dtype)  # an arbitrary cotangent
    return x, p, g


@pytest.mark.parametrize("fast, plain", [
    (add_bias, lambda x, p: x + p.astype(x.dtype)),
    (scale_features, lambda x, p: x * p.astype(x.dtype)),
])
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_equal_to_the_broadcast_op_in_values_and_gradients(fast, plain, dtype, tol):
    x, p, g = _inputs(dtype)
    y_fast, vjp_fast = jax.vjp(jax.jit(fast), x, p)
    y_plain, vjp_plain = jax.vjp(plain, x, p)
    assert y_fast.dtype == y_plain.dtype == dtype
    np.testing.assert_allclose(np.float32(y_fast), np.float32(y_plain), rtol=tol, atol=tol)
    for got, want in zip(vjp_fast(g), vjp_plain(g)):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_allclose(np.float32(got), np.float32(want), rtol=tol, atol=tol * 10)


def test_sum_over_tokens_is_a_matmul_in_float32():
    g = jnp.full((4096, 8), 1.0 / 3.0, jnp.bfloat16)
    total = sum_over_tokens(g, jnp.float32)
    np.testing.assert_allclose(total, 4096 * float(g[0, 0]), rtol=1e-6)  # bf16 sums would drift by ~1%
    hlo = jax.jit(lambda g: sum_over_tokens(g, jnp.float32)).lower(g).as_text()
    assert "dot_general" in hlo and "reduce" not in hlo.replace("reduce_precision", "")
