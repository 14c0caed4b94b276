"""Activation functions of the MLPs, with the hand-written backward that keeps SwiGLU's memory small."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lmjax.config import ModelConfig


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) * up. The hand-written backward keeps only the two inputs for the backward pass
    and recomputes the sigmoid; autodiff of `jax.nn.silu(gate) * up` stores four [B, T, F] arrays
    per layer and reads them all in the backward fusion (about 15% slower MLP on XLA:CPU)."""
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate: jax.Array, up: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(residuals: tuple[jax.Array, jax.Array], d_out: jax.Array) -> tuple[jax.Array, jax.Array]:
    gate, up = residuals
    gate32, d32 = gate.astype(jnp.float32), d_out.astype(jnp.float32)
    sig = jax.nn.sigmoid(gate32)
    # d silu(g)/dg = sigmoid(g) * (1 + g * (1 - sigmoid(g)))
    d_gate = d32 * up.astype(jnp.float32) * sig * (1 + gate32 * (1 - sig))
    d_up = d32 * gate32 * sig
    return d_gate.astype(gate.dtype), d_up.astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def gelu(x: jax.Array, config: ModelConfig) -> jax.Array:
    """The tanh approximation (GPT-2, T5 v1.1's gelu_new), or the exact erf form in bert style (as BERT was trained)."""
    return jax.nn.gelu(x, approximate=config.style != "bert")
