"""Transformer building blocks: projections, norms, RoPE, self- and cross-attention with a KV cache, MLPs.

Shape suffixes on array names: B batch, T query length, S key length, D d_model, N query heads,
K key/value heads, H head_dim, F d_ff (MLP hidden), V vocab.

Every parameter carries logical axis names (`nn.with_logical_partitioning`), the main activations
logical constraints; `lmjax.sharding` maps the names to mesh axes (no rules: unsharded).

Parameters are stored in `config.param_dtype` and cast to `config.dtype` for compute. Norm
statistics, RoPE angles and softmax (inside `jax.nn.dot_product_attention`) are float32.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import flax.linen as nn

from lmjax.config import ConfigError, ModelConfig
from lmjax.errors import UserError
from lmjax.models import cpu_matmul
from lmjax.models.activations import gelu, swiglu
from lmjax.models.feature_params import add_bias, scale_features
from lmjax.models.flash_attention import blockwise_attention
from lmjax.models.mup import attention_scale, init_multiplier, logit_multiplier
from lmjax.models.rotary import apply_rope, rope_tables


class ModelInputError(UserError):
    """Inputs of the wrong rank, length or kind for the model."""


# Logical axis names of the main activations.
RESIDUAL_AXES = ("batch", "length", "embed")
MLP_HIDDEN_AXES = ("batch", "length", "mlp")


def partitioned_normal(std: float, axes: tuple[str | None, ...]) -> nn.initializers.Initializer:
    return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def output_projection_std(config: ModelConfig) -> float:
    """GPT-2 init: projections that write into the residual stream get std / sqrt(2 * n_layers),
    so the residual variance at init does not grow with depth (two writes per block)."""
    return config.init_std / (2 * config.n_layers) ** 0.5


def init_std(config: ModelConfig, kind: str) -> float:
    """Initial std of a weight by kind (query, key_value, attention_out, mlp_in, mlp_out, router, head_dense, embedding,
    unembed). T5 style: T5X's init (fan-in variance scaling; the query also / sqrt(head_dim), for the unscaled scores; token
    table N(0, 1)). Others: `init_std`, GPT-2's depth scaling on residual writes, times μP's `init_multiplier` (1 in SP)."""
    if config.style == "t5":
        d, heads_width = config.d_model, config.n_heads * config.head_size
        fan_in = {"query": d * config.head_size, "key_value": d, "attention_out": heads_width, "mlp_in": d,
                  "mlp_out": config.d_ff, "router": d, "embedding": 1, "unembed": d}
        return fan_in[kind] ** -0.5
    std = output_projection_std(config) if kind in ("attention_out", "mlp_out") else config.init_std
    return std * init_multiplier(config, kind)


class LanguageModel(nn.Module):
    """Base of the model families: a config, and the inputs `init` is called with."""

    config: ModelConfig

    def example_inputs(self, batch: int, length: int) -> tuple[jax.Array, ...]:
        """Arguments of a forward pass of this shape (for `init` and shape inference)."""
        return (jnp.zeros((batch, length), jnp.int32),)


class Dense(nn.Module):
    """Contracts the last `in_dims` axes of x with a kernel of shape [*in_shape, *features]."""

    features: tuple[int, ...]
    kernel_axes: tuple[str, ...]  # logical names of the kernel: input axes, then feature axes
    init_std: float
    in_dims: int = 1
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    matmul: str = "auto"  # ModelConfig.matmul

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_shape = x.shape[x.ndim - self.in_dims :]
        kernel = self.param("kernel", partitioned_normal(self.init_std, self.kernel_axes), (*in_shape, *self.features), self.param_dtype)
        # One 2-D matmul [tokens, in] x [in, out]: XLA:CPU gives an N-D tensordot's weight
        # gradient a transposed operand layout and spends ~20% of the train step copying it
        # (experiments/bench/README.md); GSPMD merges the sharded leading axes without moving data.
        lead_shape = x.shape[: x.ndim - self.in_dims]
        x_2d = x.reshape(math.prod(lead_shape), math.prod(in_shape)).astype(self.dtype)
        kernel_2d = kernel.reshape(math.prod(in_shape), math.prod(self.features)).astype(self.dtype)
        y_2d = cpu_matmul.matmul(x_2d, kernel_2d) if self.matmul == "auto" else None
        if y_2d is None:
            y_2d = x_2d @ kernel_2d
        if self.use_bias:  # its gradient a matrix-vector product, not XLA:CPU's slow column reduction
            bias_init = nn.with_logical_partitioning(nn.initializers.zeros, self.kernel_axes[self.in_dims :])
            y_2d = add_bias(y_2d, self.param("bias", bias_init, self.features, self.param_dtype).reshape(-1))
        return y_2d.reshape(*lead_shape, *self.features)


class RMSNorm(nn.Module):
    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        scale_D = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (x_BTD.shape[-1],), self.param_dtype)
        x = x_BTD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return scale_features(x, scale_D.astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nn.Module):
    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        ones, zeros = (nn.with_logical_partitioning(init, ("embed",)) for init in (nn.initializers.ones, nn.initializers.zeros))
        scale_D = self.param("scale", ones, (x_BTD.shape[-1],), self.param_dtype)
        bias_D = self.param("bias", zeros, (x_BTD.shape[-1],), self.param_dtype)
        x = x_BTD.astype(jnp.float32)
        x = x - jnp.mean(x, axis=-1, keepdims=True)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return add_bias(scale_features(x, scale_D.astype(jnp.float32)), bias_D.astype(jnp.float32)).astype(self.dtype)


def make_norm(config: ModelConfig, name: str) -> nn.Module:
    norm_cls = LayerNorm if config.use_bias else RMSNorm
    return norm_cls(eps=config.norm_eps, dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype), name=name)


def dense_options(config: ModelConfig) -> dict:
    return dict(use_bias=config.use_bias, dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype),
                matmul=config.matmul)


def head_projection(config: ModelConfig, name: str, heads: int, heads_axis: str) -> Callable[[jax.Array], jax.Array]:
    """x [..., D] -> [..., heads, head_dim]: query (heads axis 'heads'), key or value ('kv_heads')."""
    kind = "query" if name == "query" else "key_value"
    dense = Dense((heads, config.head_size), ("embed", heads_axis, "head_dim"), init_std(config, kind), name=name, **dense_options(config))
    return lambda x: nn.with_logical_constraint(dense(x), ("batch", "length", heads_axis, "head_dim"))


def attention_output(config: ModelConfig) -> Callable[[jax.Array], jax.Array]:
    """The output projection `out` [N, H, D] of attention heads [B, T, N, H]."""
    dense = Dense((config.d_model,), ("heads", "head_dim", "embed"), init_std(config, "attention_out"), in_dims=2, name="out",
                  **dense_options(config))
    return lambda out_BTNH: dense(nn.with_logical_constraint(out_BTNH, ("batch", "length", "heads", "head_dim")))


def attention_kernel(config: ModelConfig) -> str | None:
    """`implementation` of jax.nn.dot_product_attention for training and eval."""
    if config.attention != "cudnn":
        return None
    if jnp.dtype(config.dtype) not in (jnp.bfloat16, jnp.float16):
        raise ConfigError(f"model.attention=cudnn needs model.dtype=bfloat16 (cuDNN flash attention), got {config.dtype}")
    return "cudnn"


class Attention(nn.Module):
    """Self-attention with grouped-query heads, segment masking and an optional KV cache.

    Training/eval (`decode=False`): query i attends to keys j <= i of the same segment, or, with
    `causal=False` (encoders), to every key of the same segment; with `config.sliding_window` w only
    to keys with i - j < w (causal only; jax's `local_window_size=(w - 1, 0)`, in cuDNN's kernel too).
    `jax.nn.dot_product_attention` handles GQA natively (query head n reads KV head n // (N/K)).
    With `config.attention == "cudnn"` the causal part runs inside the cuDNN flash kernel
    (`is_causal=True`); packed rows (segment_ids given) add a dense [B, 1, T, T] boolean mask,
    which jax turns into an additive bias for cuDNN. cuDNN needs a GPU, bf16/fp16 inputs,
    head_dim a multiple of 8 (<= 256 on Hopper, 128 before) and, with that bias, an even length.
    With "blockwise", `flash_attention.blockwise_attention` (same masks, memory linear in T; float32 on a
    CPU in its native kernel), with "blockwise_xla" the same in XLA ops only; a score bias (T5) falls back
    to jax's kernel.

    Decode (`decode=True`): keys and values are written into the 'cache' collection
    (cached_key/cached_value [B, S_max, K, H], cached_valid [B, S_max], cache_index = tokens already
    cached); the query chunk attends to every valid cached key up to its own index, and within the
    sliding window by cache slot (left padding comes first: real tokens keep their distances); the
    caller keeps start + chunk length <= S_max. One sequence per row: segment id 0 is left padding, never
    attended to (a pad query sees only itself, so its unused output stays finite); other ids (or None) are real
    tokens. Any chunk length works: one call prefills the prompt, later calls append one token each. Decode
    always uses the XLA kernel: its mask is not the square causal one cuDNN's `is_causal` assumes.
    """

    config: ModelConfig
    decode: bool = False
    causal: bool = True

    @nn.compact
    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array | None,
                 bias_BNTS: jax.Array | None = None) -> jax.Array:
        """`bias_BNTS`: an additive float32 score bias (T5's relative positions), [B or 1, N, T, S] (S: T or the cache length)."""
        cfg = self.config
        q_BTNH = head_projection(cfg, "query", cfg.n_heads, "heads")(x_BTD)
        k_BTKH = head_projection(cfg, "key", cfg.kv_heads, "kv_heads")(x_BTD)
        v_BTKH = head_projection(cfg, "value", cfg.kv_heads, "kv_heads")(x_BTD)
        blockwise = not self.decode and cfg.attention in ("blockwise", "blockwise_xla") and bias_BNTS is None
        if cfg.use_rope and not blockwise:
            q_BTNH = apply_rope(q_BTNH, positions_BT, cfg.rope_theta, cfg.rope_scaling)
            k_BTKH = apply_rope(k_BTKH, positions_BT, cfg.rope_theta, cfg.rope_scaling)

        if self.decode:
            k_BSKH, v_BSKH, mask_B1TS = self._update_cache(k_BTKH, v_BTKH, segment_ids_BT)
            out_BTNH = jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, bias=bias_BNTS, mask=mask_B1TS, scale=attention_scale(cfg))
        elif blockwise:  # RoPE inside: the CPU kernel rotates q and k in its tiles
            positions_BT = jnp.broadcast_to(positions_BT, q_BTNH.shape[:2])  # the tables are per row
            rope = rope_tables(positions_BT, cfg.head_size, cfg.rope_theta, cfg.rope_scaling) if cfg.use_rope else None
            out_BTNH = blockwise_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT=segment_ids_BT, causal=self.causal,
                                           scale=attention_scale(cfg), local_window=cfg.sliding_window if self.causal else None,
                                           cpu_kernel=cfg.attention == "blockwise", rope=rope)
        else:
            mask_B1TT = None if segment_ids_BT is None else (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])[:, None]
            out_BTNH = jax.nn.dot_product_attention(
                q_BTNH, k_BTKH, v_BTKH, bias=bias_BNTS, mask=mask_B1TT, scale=attention_scale(cfg), is_causal=self.causal,
                local_window_size=(cfg.sliding_window - 1, 0) if cfg.sliding_window and self.causal else None,
                implementation=attention_kernel(cfg),
            )
        return attention_output(cfg)(out_BTNH)

    def _update_cache(self, k_BTKH: jax.Array, v_BTKH: jax.Array, segment_ids_BT: jax.Array | None):
        # `model.init(..., decode=True)` with inputs of length S_max only creates the cache (of that length).
        initialized = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, k_BTKH.shape, k_BTKH.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, v_BTKH.shape, v_BTKH.dtype)
        # Whether a slot holds a real token; kept per layer like the keys, so nn.scan stacks it alike.
        cached_valid = self.variable("cache", "cached_valid", jnp.zeros, k_BTKH.shape[:2], jnp.bool_)
        cache_index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        query_len = k_BTKH.shape[1]
        if not initialized:
            return k_BTKH, v_BTKH, jnp.tril(jnp.ones((query_len, query_len), bool))[None, None]
        start = cache_index.value
        valid_BT = jnp.ones(k_BTKH.shape[:2], bool) if segment_ids_BT is None else segment_ids_BT != 0
        cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, k_BTKH.astype(cached_key.value.dtype), (0, start, 0, 0))
        cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, v_BTKH.astype(cached_value.value.dtype), (0, start, 0, 0))
        cached_valid.value = jax.lax.dynamic_update_slice(cached_valid.value, valid_BT, (0, start))
        cache_index.value = start + query_len
        key_index_1S, query_index_T1 = jnp.arange(cached_key.value.shape[1])[None, :], start + jnp.arange(query_len)[:, None]
        window = self.config.sliding_window or cached_key.value.shape[1]  # None: every cached key
        in_window_TS = (key_index_1S <= query_index_T1) & (query_index_T1 - key_index_1S < window)
        visible_BTS = (in_window_TS & cached_valid.value[:, None, :]) | (key_index_1S == query_index_T1)
        return cached_key.value, cached_value.value, visible_BTS[:, None]


class CrossAttention(nn.Module):
    """Decoder queries attend to the encoder output (no position bias, T5's EncDecAttention)."""

    config: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x_BTD: jax.Array, encoded_BSD: jax.Array | None, mask_B1TS: jax.Array | None) -> jax.Array:
        cfg = self.config
        q_BTNH = head_projection(cfg, "query", cfg.n_heads, "heads")(x_BTD)
        if encoded_BSD is not None:
            k_BSKH = head_projection(cfg, "key", cfg.kv_heads, "kv_heads")(encoded_BSD)
            v_BSKH = head_projection(cfg, "value", cfg.kv_heads, "kv_heads")(encoded_BSD)
        if self.decode:  # the encoder's keys/values, projected once per generation
            if encoded_BSD is None and not self.has_variable("cache", "cached_key"):
                raise ModelInputError("encoded: the first decoding call must pass the encoder output (cross-attention cache is empty)")
            cached_key = self.variable("cache", "cached_key", lambda: k_BSKH)
            cached_value = self.variable("cache", "cached_value", lambda: v_BSKH)
            if encoded_BSD is not None:
                cached_key.value, cached_value.value = k_BSKH, v_BSKH
            k_BSKH, v_BSKH = cached_key.value, cached_value.value
        elif encoded_BSD is None:
            raise ModelInputError("encoded: the encoder output is required outside decoding")
        out_BTNH = jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_B1TS, scale=attention_scale(cfg))
        return attention_output(cfg)(out_BTNH)


class MLP(nn.Module):
    """`config.ffn`: swiglu down(silu(gate(x)) * up(x)) (llama), gated_gelu down(gelu(gate(x)) * up(x))
    (T5 v1.1), gelu down(gelu(fc_in(x))) (gpt2, bert), relu down(relu(fc_in(x))) (original T5).
    Biases in gpt2 and bert style."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        cfg = self.config
        options = dense_options(cfg)

        def hidden(name: str) -> jax.Array:
            dense = Dense((cfg.d_ff,), ("embed", "mlp"), init_std(cfg, "mlp_in"), name=name, **options)
            return nn.with_logical_constraint(dense(x_BTD), MLP_HIDDEN_AXES)

        if cfg.ffn == "swiglu":
            h_BTF = swiglu(hidden("gate"), hidden("up"))
        elif cfg.ffn == "gated_gelu":
            h_BTF = gelu(hidden("gate"), cfg) * hidden("up")
        elif cfg.ffn == "relu":
            h_BTF = jax.nn.relu(hidden("fc_in"))
        else:
            h_BTF = gelu(hidden("fc_in"), cfg)
        h_BTF = nn.with_logical_constraint(h_BTF, MLP_HIDDEN_AXES)
        down = Dense((cfg.d_model,), ("mlp", "embed"), init_std(cfg, "mlp_out"), name="down", **options)
        return down(h_BTF)


class Block(nn.Module):
    """Transformer block, pre-norm (x + f(norm(x))) or, with `config.post_norm`, post-norm
    (norm(x + f(x)), BERT). Returns (x, None) so `nn.scan` can stack it as (carry, output)."""

    config: ModelConfig
    decode: bool = False
    mlp_cls: type[nn.Module] = MLP  # the feed-forward: MLP, or moe.MoEFeedForward in MoE layers
    causal: bool = True

    @nn.compact
    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array | None,
                 bias_BNTS: jax.Array | None = None) -> tuple[jax.Array, None]:
        cfg = self.config
        attention = Attention(cfg, decode=self.decode, causal=self.causal, name="attention")
        if self.mlp_cls is MLP:
            mlp = MLP(cfg, name="mlp")
        else:  # moe.MoEFeedForward: capacity counted per document, no drops while decoding
            mlp = functools.partial(self.mlp_cls(cfg, decode=self.decode, name="mlp"), positions_BT=positions_BT,
                                    segment_ids_BT=segment_ids_BT)
        attention_norm, mlp_norm = make_norm(cfg, "attention_norm"), make_norm(cfg, "mlp_norm")
        if cfg.post_norm:
            x_BTD = attention_norm(x_BTD + attention(x_BTD, positions_BT, segment_ids_BT, bias_BNTS))
            x_BTD = nn.with_logical_constraint(x_BTD, RESIDUAL_AXES)
            x_BTD = mlp_norm(x_BTD + mlp(x_BTD))
        else:
            x_BTD = x_BTD + attention(attention_norm(x_BTD), positions_BT, segment_ids_BT, bias_BNTS)
            x_BTD = nn.with_logical_constraint(x_BTD, RESIDUAL_AXES)
            x_BTD = x_BTD + mlp(mlp_norm(x_BTD))
        return nn.with_logical_constraint(x_BTD, RESIDUAL_AXES), None


def lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
    """Rows of a (possibly sharded) table. The table is all-gathered first, as FSDP does for every
    weight: a gather from a vocab-sharded table otherwise makes XLA's partitioner replicate it the
    slow way ("involuntary full rematerialization")."""
    return jnp.take(nn.with_logical_constraint(table, (None, None)), ids, axis=0)


class Embed(nn.Module):
    """Token embedding table [V, D]; `attend` reuses it as the tied unembedding."""

    config: ModelConfig

    def setup(self) -> None:
        cfg = self.config
        table_init = partitioned_normal(init_std(cfg, "embedding"), ("vocab", "embed"))
        self.embedding = self.param("embedding", table_init, (cfg.vocab_size, cfg.d_model), jnp.dtype(cfg.param_dtype))

    def __call__(self, tokens_BT: jax.Array) -> jax.Array:
        return lookup(self.embedding, tokens_BT).astype(jnp.dtype(self.config.dtype))

    def attend(self, x_BTD: jax.Array) -> jax.Array:
        table_VD = self.embedding.astype(jnp.dtype(self.config.dtype))
        return jnp.einsum("btd,vd->btv", x_BTD, table_VD, preferred_element_type=jnp.float32)


def learned_positions(module: nn.Module, config: ModelConfig, positions_BT: jax.Array) -> jax.Array:
    """Rows of the learned position table `position_embedding` [max_seq_len, D] of `module`."""
    table_init = partitioned_normal(config.init_std, (None, "embed"))
    table = module.param("position_embedding", table_init, (config.max_seq_len, config.d_model), jnp.dtype(config.param_dtype))
    return lookup(table, positions_BT).astype(jnp.dtype(config.dtype))


def unembed_matrix(module: nn.Module, config: ModelConfig) -> jax.Array:
    """The untied readout `unembed` [D, V] of `module` (parameter dtype); also read by fused_cross_entropy.py."""
    unembed_init = partitioned_normal(init_std(config, "unembed"), ("embed", "vocab"))
    return module.param("unembed", unembed_init, (config.d_model, config.vocab_size), jnp.dtype(config.param_dtype))


def output_logits(module: nn.Module, config: ModelConfig, embed: Embed, x_BTD: jax.Array) -> jax.Array:
    """float32 logits [B, T, V]: the tied embedding table, or the `unembed` [D, V] matrix of `module`, times μP's 1/m."""
    if config.tie_embeddings:
        logits_BTV = embed.attend(x_BTD)
    else:
        unembed_DV = unembed_matrix(module, config)
        logits_BTV = jnp.einsum("btd,dv->btv", x_BTD, unembed_DV.astype(x_BTD.dtype), preferred_element_type=jnp.float32)
    if (multiplier := logit_multiplier(config)) != 1.0:  # skipped at 1.0: μP at the base width is SP bit for bit
        logits_BTV = logits_BTV * multiplier
    return nn.with_logical_constraint(logits_BTV.astype(jnp.float32), ("batch", "length", "vocab"))
