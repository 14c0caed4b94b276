"""Encoder-decoder transformer, T5 v1.1 (Raffel et al. 2020; the T5 v1.1 and Flan-T5 checkpoints).

    logits_BTV = T5(config).apply({"params": params}, encoder_tokens, decoder_tokens,
                                  encoder_positions, encoder_segment_ids, decoder_positions, decoder_segment_ids)

encoder_tokens int [B, S]; decoder_tokens int [B, T] (the targets shifted right, each sequence
starting with the decoder start token, pad as in T5). Positions (default arange per row) only feed
the relative position biases; segment ids (default: one segment per row, 0 = padding) keep packed
pairs apart: encoder token i sees the encoder tokens of its segment, decoder token j sees the
earlier decoder tokens of its segment and the encoder tokens of the same segment number. Returns
float32 logits [B, T, vocab_size]. `encode` and `decode` are the two halves (generation runs the
encoder once).

Architecture (`model.style: t5`): a shared token table `embed/embedding`; per stack a relative
position bias table `relative_bias/table` [relative_buckets, n_heads] (bidirectional buckets in the
encoder, causal in the decoder), computed once per stack and added to the scores of every layer's
self-attention (T5 keeps it in the first layer and shares it: the same function); pre-norm blocks
with T5's RMSNorm (no mean subtraction, no bias); attention scores unscaled (T5 folds 1/sqrt(H)
into the query init); decoder blocks add cross-attention (`cross_attention`, no position bias)
between self-attention and the MLP; gated-GELU MLPs (`model.feed_forward`); a final norm per
stack; logits from an untied `unembed` [D, V], or with `tie_embeddings` from the token table after
scaling by d_model^-0.5 (original T5). No dropout (T5 v1.1 pretrains without it).

Parameters: `encoder/{relative_bias/table, layers/..., final_norm}`, `decoder/{relative_bias/table,
layers/..., final_norm}` (`layers` stacked on a leading axis with scan_layers, else `layer_i`), `embed`,
`unembed`. Every weight carries logical axis names, so both stacks shard over the mesh rules.

Decoding (`decode=True`, cache from `init_cache`): each decoder layer caches its self-attention
keys/values (as the decoder LM) and, from the first call, the keys/values of the encoder output
for cross-attention; later calls pass `encoded=None` and read them from the cache.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmjax import flops
from lmjax.config import ModelConfig
from lmjax.models.layers import (
    MLP,
    RESIDUAL_AXES,
    Attention,
    Block,
    CrossAttention,
    Embed,
    LanguageModel,
    ModelInputError,
    init_std,
    make_norm,
    partitioned_normal,
)
from lmjax.models.stacking import block_class, run_layer, scan_stack


def relative_position_buckets(relative_BTS: jax.Array, bidirectional: bool, num_buckets: int, max_distance: int) -> jax.Array:
    """T5's bucket of each relative position (key position - query position), int32.

    Half the buckets (all of them when causal) hold exact distances 0 .. n/2 - 1, the rest grow
    logarithmically up to `max_distance`, beyond which every distance shares the last bucket.
    Bidirectional: keys after the query use the upper half of the buckets. Causal: keys after the
    query fall in bucket 0 with distance 0 (they are masked anyway)."""
    buckets = jnp.zeros(relative_BTS.shape, jnp.int32)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_BTS > 0).astype(jnp.int32) * num_buckets
        distance = jnp.abs(relative_BTS)
    else:
        distance = -jnp.minimum(relative_BTS, 0)
    max_exact = num_buckets // 2
    log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(distance < max_exact, distance, large)


class RelativeBias(nn.Module):
    """The stack's `relative_bias/table` [buckets, N] -> score biases [B, N, T, S] (float32)."""

    config: ModelConfig
    bidirectional: bool

    @nn.compact
    def __call__(self, query_positions_BT: jax.Array, key_positions_BS: jax.Array) -> jax.Array:
        cfg = self.config
        table_init = partitioned_normal(init_std(cfg, "key_value"), (None, "heads"))
        table_RN = self.param("table", table_init, (cfg.relative_buckets, cfg.n_heads), jnp.dtype(cfg.param_dtype))
        relative_BTS = key_positions_BS[:, None, :] - query_positions_BT[:, :, None]
        buckets_BTS = relative_position_buckets(relative_BTS, self.bidirectional, cfg.relative_buckets, cfg.relative_max_distance)
        bias_BTSN = jnp.take(table_RN.astype(jnp.float32), buckets_BTS, axis=0)
        return nn.with_logical_constraint(bias_BTSN.transpose(0, 3, 1, 2), ("batch", "heads", "length", None))


class DecoderBlock(nn.Module):
    """Pre-norm: x + self_attention(norm(x)), x + cross_attention(norm(x)), x + mlp(norm(x))."""

    config: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x_BTD, positions_BT, segment_ids_BT, bias_BNTS, encoded_BSD, cross_mask_B1TS) -> tuple[jax.Array, None]:
        cfg = self.config
        attention = Attention(cfg, decode=self.decode, causal=True, name="attention")
        x_BTD = x_BTD + attention(make_norm(cfg, "attention_norm")(x_BTD), positions_BT, segment_ids_BT, bias_BNTS)
        x_BTD = nn.with_logical_constraint(x_BTD, RESIDUAL_AXES)
        cross = CrossAttention(cfg, decode=self.decode, name="cross_attention")
        x_BTD = x_BTD + cross(make_norm(cfg, "cross_attention_norm")(x_BTD), encoded_BSD, cross_mask_B1TS)
        x_BTD = nn.with_logical_constraint(x_BTD, RESIDUAL_AXES)
        x_BTD = x_BTD + MLP(cfg, name="mlp")(make_norm(cfg, "mlp_norm")(x_BTD))
        return nn.with_logical_constraint(x_BTD, RESIDUAL_AXES), None


def _stack(cfg: ModelConfig, block: type[nn.Module], n_layers: int, decode: bool, x_BTD, *args, **block_kwargs) -> jax.Array:
    """n_layers blocks over x (scanned or unrolled), every other argument broadcast to each."""
    block_cls = block_class(cfg, decode, block)
    if cfg.scan_layers:
        x_BTD, _ = scan_stack(block_cls, n_layers)(cfg, decode=decode, **block_kwargs, name="layers")(x_BTD, *args)
        return x_BTD
    for i in range(n_layers):
        x_BTD, _ = run_layer(cfg, block_cls(cfg, decode=decode, **block_kwargs, name=f"layer_{i}"), x_BTD, *args)
    return x_BTD


class Encoder(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_BSD: jax.Array, positions_BS: jax.Array, segment_ids_BS: jax.Array | None) -> jax.Array:
        cfg = self.config
        bias_BNSS = RelativeBias(cfg, bidirectional=True, name="relative_bias")(positions_BS, positions_BS)
        x_BSD = _stack(cfg, Block, cfg.n_layers, False, x_BSD, positions_BS, segment_ids_BS, bias_BNSS, causal=False)
        return make_norm(cfg, "final_norm")(x_BSD)


class Decoder(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, positions_BT, segment_ids_BT, encoded_BSD, encoder_segment_ids_BS, decode: bool) -> jax.Array:
        cfg = self.config
        key_positions_BS = positions_BT
        if decode:
            # Keys are the cache slots 0 .. S_max - 1 (the length the cache was created with).
            initialized = self.has_variable("cache", "key_positions")
            length = x_BTD.shape[1]
            key_positions_BS = self.variable("cache", "key_positions", lambda: jnp.arange(length, dtype=jnp.int32)[None]).value
            if not initialized:
                key_positions_BS = positions_BT
        bias_BNTS = RelativeBias(cfg, bidirectional=False, name="relative_bias")(positions_BT, key_positions_BS)
        cross_mask_B1TS = None  # [B, 1, T or 1, S]
        if encoder_segment_ids_BS is not None and segment_ids_BT is not None:  # packed pairs: segment k reads segment k
            cross_mask_B1TS = (segment_ids_BT[:, :, None] == encoder_segment_ids_BS[:, None, :])[:, None]
        elif encoder_segment_ids_BS is not None:  # one pair per row: every decoder token reads the unpadded input
            cross_mask_B1TS = (encoder_segment_ids_BS > 0)[:, None, None, :]
        x_BTD = _stack(
            cfg, DecoderBlock, cfg.n_decoder_layers, decode, x_BTD, positions_BT, segment_ids_BT, bias_BNTS, encoded_BSD, cross_mask_B1TS
        )
        return make_norm(cfg, "final_norm")(x_BTD)


class T5(LanguageModel):
    def setup(self) -> None:
        cfg = self.config
        self.embed = Embed(cfg)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if not cfg.tie_embeddings:
            unembed_init = partitioned_normal(init_std(cfg, "unembed"), ("embed", "vocab"))
            self.unembed = self.param("unembed", unembed_init, (cfg.d_model, cfg.vocab_size), jnp.dtype(cfg.param_dtype))

    def example_inputs(self, batch: int, length: int) -> tuple[jax.Array, ...]:
        tokens = jnp.zeros((batch, length), jnp.int32)
        return tokens, tokens

    def __call__(
        self,
        encoder_tokens: jax.Array,
        decoder_tokens: jax.Array,
        encoder_positions: jax.Array | None = None,
        encoder_segment_ids: jax.Array | None = None,
        decoder_positions: jax.Array | None = None,
        decoder_segment_ids: jax.Array | None = None,
        decode: bool = False,
    ) -> jax.Array:
        encoded_BSD = self.encode(encoder_tokens, encoder_positions, encoder_segment_ids)
        return self.decode(decoder_tokens, encoded_BSD, encoder_segment_ids, decoder_positions, decoder_segment_ids, decode)

    def encode(self, tokens: jax.Array, positions: jax.Array | None = None, segment_ids: jax.Array | None = None) -> jax.Array:
        """Encoder output [B, S, D] in the compute dtype."""
        _check_inputs("encoder_tokens", tokens, positions, segment_ids)
        positions_BS = positions if positions is not None else _arange_positions(tokens)
        x_BSD = nn.with_logical_constraint(self.embed(tokens), RESIDUAL_AXES)
        return self.encoder(x_BSD, positions_BS, segment_ids)

    def decode(
        self,
        tokens: jax.Array,
        encoded: jax.Array | None,
        encoder_segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        decode: bool = False,
    ) -> jax.Array:
        """float32 logits [B, T, V] of the decoder; `encoded` may be None after the first decoding call."""
        _check_inputs("decoder_tokens", tokens, positions, segment_ids)
        if decode and segment_ids is not None:
            raise ModelInputError("segment_ids: must be None with decode=True (one sequence per row while decoding)")
        positions_BT = positions if positions is not None else _arange_positions(tokens)
        x_BTD = nn.with_logical_constraint(self.embed(tokens), RESIDUAL_AXES)
        x_BTD = self.decoder(x_BTD, positions_BT, segment_ids, encoded, encoder_segment_ids, decode)
        if self.config.tie_embeddings:  # original T5: the tied table reads a rescaled output
            logits_BTV = self.embed.attend(x_BTD * self.config.d_model**-0.5)
        else:
            logits_BTV = jnp.einsum("btd,dv->btv", x_BTD, self.unembed.astype(x_BTD.dtype), preferred_element_type=jnp.float32)
        return nn.with_logical_constraint(logits_BTV.astype(jnp.float32), ("batch", "length", "vocab"))


def _arange_positions(tokens_BT: jax.Array) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(tokens_BT.shape[1], dtype=jnp.int32), tokens_BT.shape)


def _check_inputs(name: str, tokens_BT, positions_BT, segment_ids_BT) -> None:
    if tokens_BT.ndim != 2 or not jnp.issubdtype(tokens_BT.dtype, jnp.integer):
        raise ModelInputError(f"{name}: expected an integer array [batch, length], got {tokens_BT.dtype} {tokens_BT.shape}")
    for what, array in (("positions", positions_BT), ("segment_ids", segment_ids_BT)):
        if array is not None and array.shape != tokens_BT.shape:
            raise ModelInputError(f"{name}: {what} of shape {array.shape} do not match the tokens' {tokens_BT.shape}")


def init_cache(model: T5, batch_size: int, max_length: int, encoder_length: int) -> dict:
    """Zeroed 'cache' collection for decoding up to `max_length` decoder tokens per row against
    an encoder output of `encoder_length` tokens. Built from shapes only."""
    encoder_tokens = jnp.zeros((batch_size, encoder_length), jnp.int32)
    decoder_tokens = jnp.zeros((batch_size, max_length), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), encoder_tokens, decoder_tokens, decode=True))["cache"]
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    # The cache slots' positions are data, not zeros.
    cache["decoder"]["key_positions"] = jnp.arange(max_length, dtype=jnp.int32)[None]
    return cache


# ----------------------------------------------------------------------------- counts (lmjax.flops)


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """See `lmjax.flops.param_counts`. Decoder blocks add cross-attention and its norm; each stack
    has a relative-bias table and a final norm; the token table is shared by both stacks."""
    block = flops.block_params(cfg)
    encoder_block = sum(block.values())
    decoder_block = encoder_block + block["attention"] + flops.norm_params(cfg)
    per_stack = cfg.relative_buckets * cfg.n_heads + flops.norm_params(cfg)
    embedding, output_head = flops.embedding_params(cfg), flops.output_head_params(cfg)
    total = embedding + cfg.n_layers * encoder_block + cfg.n_decoder_layers * decoder_block + 2 * per_stack + output_head
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding, "output_head": output_head, "active": total}


def forward_terms(cfg: ModelConfig, seq_len: int, decoder_len: int | None = None) -> dict[str, float]:
    """Appendix-F terms of one example: `seq_len` encoder tokens, `decoder_len` decoder tokens.

    The encoder counts as the decoder-only model without logits, the decoder as one with
    `n_decoder_layers` layers of length decoder_len, plus cross-attention: query and output
    projections per decoder token, key/value projections per encoder token, and the T x S scores
    and values. The embedding is counted for the tokens of both stacks. Per token (the unit of
    `flops_per_token`) means per encoder plus decoder token."""
    if decoder_len is None:
        raise flops.FlopsError("family t5: FLOPs need the decoder length (decoder_len) as well as seq_len")
    args = dict(d_model=cfg.d_model, n_heads=cfg.n_heads, head_dim=cfg.head_size, d_ff=cfg.d_ff, vocab_size=cfg.vocab_size,
                n_kv_heads=cfg.kv_heads, mlp_matrices=cfg.mlp_matrices)
    encoder = flops.chinchilla_forward_terms(seq_len, n_layers=cfg.n_layers, **args)
    decoder = flops.chinchilla_forward_terms(decoder_len, n_layers=cfg.n_decoder_layers, **args)
    terms = {f"encoder_{k}": v for k, v in encoder.items() if k != "logits"}
    terms.update({f"decoder_{k}": v for k, v in decoder.items()})
    layers, d, enc, dec = float(cfg.n_decoder_layers), float(cfg.d_model), float(seq_len), float(decoder_len)
    q_width, kv_width = float(cfg.n_heads * cfg.head_size), float(cfg.kv_heads * cfg.head_size)
    terms["cross_attention_projections"] = layers * (2 * dec * d * q_width + 2 * 2 * enc * d * kv_width + 2 * dec * q_width * d)
    terms["cross_attention_logits"] = layers * 2 * dec * enc * q_width
    terms["cross_attention_softmax"] = layers * 3 * cfg.n_heads * dec * enc
    terms["cross_attention_values"] = layers * 2 * dec * enc * q_width
    return terms
