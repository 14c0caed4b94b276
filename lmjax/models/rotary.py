"""Rotary position embedding (RoPE, Su et al. 2021) in the rotate-half layout of Llama / GPT-NeoX.

The rotation is split into its tables (`rope_tables`: cos and sin per row and frequency) and their
application (`rotate`), so that the CPU attention kernel can apply the same tables inside its tiles
(flash_attention.blockwise_attention's `rope`), where XLA would otherwise write rotated copies of q
and k and, in the backward, rotate their gradients back in separate passes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lmjax.config import RopeScalingConfig


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScalingConfig) -> jnp.ndarray:
    """float32 [head_dim // 2]: theta^(-2i/head_dim), rescaled by `scaling` with transformers' float32
    operations in its order (torch's `x / t` is a reciprocal then a product). Unscaled: lmjax's first
    expression (last-place differences from transformers'), so older runs resume bit for bit."""
    f32, s = np.float32, scaling
    if s.kind == "none":
        return theta ** (-jnp.arange(head_dim // 2, dtype=jnp.float32) / (head_dim // 2))
    exponent_h = np.arange(0, head_dim, 2).astype(f32) / f32(head_dim)
    inv_freq_h = f32(1) / (np.float64(theta) ** exponent_h.astype(np.float64)).astype(f32)
    if s.kind == "linear":
        inv_freq_h = inv_freq_h / f32(s.factor)
    elif s.kind == "llama3":  # wavelengths over original / low slowed by factor, under original / high kept
        context, low, high = s.original_max_position_embeddings, s.low_freq_factor, s.high_freq_factor
        wavelen_h = f32(1) / inv_freq_h * f32(2 * math.pi)
        smooth_h = (f32(1) / wavelen_h * f32(context) - f32(low)) / f32(high - low)  # 0 at original / low, 1 at original / high
        smoothed_h = (f32(1) - smooth_h) * inv_freq_h / f32(s.factor) + smooth_h * inv_freq_h
        inv_freq_h = np.where(wavelen_h > f32(context / low), inv_freq_h / f32(s.factor),
                              np.where(wavelen_h < f32(context / high), inv_freq_h, smoothed_h))
    return jnp.asarray(inv_freq_h, jnp.float32)


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, theta: float, scaling: RopeScalingConfig | None = None) -> jax.Array:
    """Rotary embedding (Su et al. 2021) in the rotate-half layout used by Llama/GPT-NeoX: dimension i
    is paired with i + H/2 and the pair rotated by positions * `rope_inverse_frequencies`[i]."""
    return rotate(x_BTNH, *rope_tables(positions_BT, x_BTNH.shape[-1], theta, scaling))


def rope_tables(positions_BT: jax.Array, head_dim: int, theta: float, scaling: RopeScalingConfig | None = None
                ) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) float32 [B, T, head_dim / 2] of the rotation angles positions * inverse frequencies."""
    inv_freq_h = rope_inverse_frequencies(head_dim, theta, scaling or RopeScalingConfig())
    angles_BTh = positions_BT.astype(jnp.float32)[..., None] * inv_freq_h
    return jnp.cos(angles_BTh), jnp.sin(angles_BTh)


def rotate(x_BTNH: jax.Array, cos_BTh: jax.Array, sin_BTh: jax.Array) -> jax.Array:
    """x with each pair (i, i + H/2) rotated by the tables' angle for its row (every head alike)."""
    cos_BT1h, sin_BT1h = cos_BTh[:, :, None, :], sin_BTh[:, :, None, :]
    x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos_BT1h - x2 * sin_BT1h, x2 * cos_BT1h + x1 * sin_BT1h], axis=-1)
    return rotated.astype(x_BTNH.dtype)
