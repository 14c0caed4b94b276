"""Transformer building blocks: projections, norms, RoPE, attention with a KV cache, MLPs.

Shape suffixes on array names: B batch, T query length, S key length, D d_model, N query heads,
K key/value heads, H head_dim, F d_ff (MLP hidden), V vocab.

Every parameter carries logical axis names (`nn.with_logical_partitioning`) and the main
activations carry logical constraints; `lmjax.sharding` maps the names to mesh axes. With no
rules active the constraints are no-ops, so the same code runs unsharded.

Parameters are stored in `config.param_dtype` and cast to `config.dtype` for compute. Norm
statistics, RoPE angles and softmax (inside `jax.nn.dot_product_attention`) are float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import flax.linen as nn

from lmjax.config import ConfigError, ModelConfig

# Logical axis names of the main activations.
RESIDUAL_AXES = ("batch", "length", "embed")
MLP_HIDDEN_AXES = ("batch", "length", "mlp")


def partitioned_normal(std: float, axes: tuple[str | None, ...]) -> nn.initializers.Initializer:
    return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def output_projection_std(config: ModelConfig) -> float:
    """GPT-2 init: projections that write into the residual stream get std / sqrt(2 * n_layers),
    so the residual variance at init does not grow with depth (two writes per block)."""
    return config.init_std / (2 * config.n_layers) ** 0.5


class Dense(nn.Module):
    """Contracts the last `in_dims` axes of x with a kernel of shape [*in_shape, *features]."""

    features: tuple[int, ...]
    kernel_axes: tuple[str, ...]  # logical names of the kernel: input axes, then feature axes
    init_std: float
    in_dims: int = 1
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_shape = x.shape[x.ndim - self.in_dims :]
        kernel = self.param(
            "kernel", partitioned_normal(self.init_std, self.kernel_axes), (*in_shape, *self.features), self.param_dtype
        )
        # One 2-D matmul [tokens, in] x [in, out]: XLA:CPU gives an N-D tensordot's weight
        # gradient a transposed operand layout and spends ~20% of the train step copying it
        # (experiments/bench/README.md); GSPMD merges the sharded leading axes without moving data.
        lead_shape = x.shape[: x.ndim - self.in_dims]
        x_2d = x.reshape(math.prod(lead_shape), math.prod(in_shape)).astype(self.dtype)
        y_2d = x_2d @ kernel.reshape(math.prod(in_shape), math.prod(self.features)).astype(self.dtype)
        y = y_2d.reshape(*lead_shape, *self.features)
        if self.use_bias:
            bias_axes = self.kernel_axes[self.in_dims :]
            bias_init = nn.with_logical_partitioning(nn.initializers.zeros, bias_axes)
            y = y + self.param("bias", bias_init, self.features, self.param_dtype).astype(self.dtype)
        return y


class RMSNorm(nn.Module):
    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        ones = nn.with_logical_partitioning(nn.initializers.ones, ("embed",))
        scale_D = self.param("scale", ones, (x_BTD.shape[-1],), self.param_dtype)
        x = x_BTD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (x * scale_D.astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nn.Module):
    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        d_model = x_BTD.shape[-1]
        ones = nn.with_logical_partitioning(nn.initializers.ones, ("embed",))
        zeros = nn.with_logical_partitioning(nn.initializers.zeros, ("embed",))
        scale_D = self.param("scale", ones, (d_model,), self.param_dtype)
        bias_D = self.param("bias", zeros, (d_model,), self.param_dtype)
        x = x_BTD.astype(jnp.float32)
        x = x - jnp.mean(x, axis=-1, keepdims=True)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (x * scale_D.astype(jnp.float32) + bias_D.astype(jnp.float32)).astype(self.dtype)


def make_norm(config: ModelConfig, name: str) -> nn.Module:
    norm_cls = RMSNorm if config.style == "llama" else LayerNorm
    return norm_cls(eps=config.norm_eps, dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype), name=name)


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding (Su et al. 2021) in the rotate-half layout used by Llama/GPT-NeoX:
    dimension i is paired with i + H/2 and the pair is rotated by positions * theta^(-2i/H)."""
    half = x_BTNH.shape[-1] // 2
    inv_freq_h = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles_BTh = positions_BT.astype(jnp.float32)[..., None] * inv_freq_h
    sin_BT1h, cos_BT1h = jnp.sin(angles_BTh)[:, :, None, :], jnp.cos(angles_BTh)[:, :, None, :]
    x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos_BT1h - x2 * sin_BT1h, x2 * cos_BT1h + x1 * sin_BT1h], axis=-1)
    return rotated.astype(x_BTNH.dtype)


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads, segment masking and an optional KV cache.

    Training/eval (`decode=False`): query i attends to keys j <= i of the same segment.
    `jax.nn.dot_product_attention` handles GQA natively (query head n reads KV head n // (N/K)).
    With `config.attention == "cudnn"` the causal part runs inside the cuDNN flash kernel
    (`is_causal=True`); packed rows (segment_ids given) add a dense [B, 1, T, T] boolean mask,
    which jax turns into an additive bias for cuDNN. cuDNN needs a GPU, bf16/fp16 inputs,
    head_dim a multiple of 8 (<= 256 on Hopper, 128 before) and, with that bias, an even length.

    Decode (`decode=True`): keys and values are written into the 'cache' collection
    (cached_key/cached_value [B, S_max, K, H], cache_index = tokens already cached) and the query
    chunk attends to every cached key up to its own index (segment_ids must be None: one sequence
    per row; the caller keeps start + chunk length <= S_max). Any chunk length works, so one call
    prefills the prompt and later calls append one token each. Decode always uses the XLA kernel:
    its mask is not the square causal one cuDNN's `is_causal` assumes.
    """

    config: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array | None) -> jax.Array:
        cfg = self.config
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        use_bias = cfg.style == "gpt2"

        def project(name: str, heads: int, heads_axis: str) -> jax.Array:
            dense = Dense(
                features=(heads, cfg.head_size),
                kernel_axes=("embed", heads_axis, "head_dim"),
                init_std=cfg.init_std,
                use_bias=use_bias,
                dtype=dtype,
                param_dtype=param_dtype,
                name=name,
            )
            return nn.with_logical_constraint(dense(x_BTD), ("batch", "length", heads_axis, "head_dim"))

        q_BTNH = project("query", cfg.n_heads, "heads")
        k_BTKH = project("key", cfg.kv_heads, "kv_heads")
        v_BTKH = project("value", cfg.kv_heads, "kv_heads")
        if cfg.style == "llama":
            q_BTNH = apply_rope(q_BTNH, positions_BT, cfg.rope_theta)
            k_BTKH = apply_rope(k_BTKH, positions_BT, cfg.rope_theta)

        if self.decode:
            k_BSKH, v_BSKH, mask_11TS = self._update_cache(k_BTKH, v_BTKH)
            out_BTNH = jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_11TS)
        else:
            mask_B1TT = None
            if segment_ids_BT is not None:
                mask_B1TT = (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])[:, None]
            implementation = None
            if cfg.attention == "cudnn":
                if dtype not in (jnp.bfloat16, jnp.float16):
                    raise ConfigError(f"model.attention=cudnn needs model.dtype=bfloat16 (cuDNN flash attention), got {cfg.dtype}")
                implementation = "cudnn"
            out_BTNH = jax.nn.dot_product_attention(
                q_BTNH, k_BTKH, v_BTKH, mask=mask_B1TT, is_causal=True, implementation=implementation
            )
        out_BTNH = nn.with_logical_constraint(out_BTNH, ("batch", "length", "heads", "head_dim"))
        return Dense(
            features=(cfg.d_model,),
            kernel_axes=("heads", "head_dim", "embed"),
            init_std=output_projection_std(cfg),
            in_dims=2,
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            name="out",
        )(out_BTNH)

    def _update_cache(self, k_BTKH: jax.Array, v_BTKH: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        # `model.init(..., decode=True)` with inputs of length S_max only creates the cache; the
        # cache length is the input length of that call.
        initialized = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, k_BTKH.shape, k_BTKH.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, v_BTKH.shape, v_BTKH.dtype)
        cache_index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        query_len = k_BTKH.shape[1]
        if not initialized:
            causal_11TT = jnp.tril(jnp.ones((query_len, query_len), bool))[None, None]
            return k_BTKH, v_BTKH, causal_11TT
        start = cache_index.value
        cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, k_BTKH.astype(cached_key.value.dtype), (0, start, 0, 0))
        cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, v_BTKH.astype(cached_value.value.dtype), (0, start, 0, 0))
        cache_index.value = start + query_len
        max_len = cached_key.value.shape[1]
        query_index_T = start + jnp.arange(query_len)
        visible_11TS = (jnp.arange(max_len)[None, :] <= query_index_T[:, None])[None, None]
        return cached_key.value, cached_value.value, visible_11TS


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


class MLP(nn.Module):
    """llama: SwiGLU, down(silu(gate(x)) * up(x)), no biases. gpt2: fc_out(gelu(fc_in(x))) with biases."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        cfg = self.config
        common = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        use_bias = cfg.style == "gpt2"

        def hidden(name: str) -> jax.Array:
            dense = Dense((cfg.d_ff,), ("embed", "mlp"), cfg.init_std, use_bias=use_bias, name=name, **common)
            return nn.with_logical_constraint(dense(x_BTD), MLP_HIDDEN_AXES)

        if cfg.style == "llama":
            h_BTF = swiglu(hidden("gate"), hidden("up"))
        else:
            h_BTF = jax.nn.gelu(hidden("fc_in"), approximate=True)  # GPT-2's tanh approximation
        h_BTF = nn.with_logical_constraint(h_BTF, MLP_HIDDEN_AXES)
        down = Dense((cfg.d_model,), ("mlp", "embed"), output_projection_std(cfg), use_bias=use_bias, name="down", **common)
        return down(h_BTF)


class Block(nn.Module):
    """Pre-norm transformer block. Returns (x, None) so `nn.scan` can stack it as (carry, output)."""

    config: ModelConfig
    decode: bool = False
    mlp_cls: type[nn.Module] = MLP  # the feed-forward: MLP, or moe.MoEFeedForward in MoE layers

    @nn.compact
    def __call__(
        self, x_BTD: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array | None
    ) -> tuple[jax.Array, None]:
        attention = Attention(self.config, decode=self.decode, name="attention")
        x_BTD = x_BTD + attention(make_norm(self.config, "attention_norm")(x_BTD), positions_BT, segment_ids_BT)
        x_BTD = nn.with_logical_constraint(x_BTD, RESIDUAL_AXES)
        x_BTD = x_BTD + self.mlp_cls(self.config, name="mlp")(make_norm(self.config, "mlp_norm")(x_BTD))
        return nn.with_logical_constraint(x_BTD, RESIDUAL_AXES), None
