"""Encoder-only masked language model, BERT-style (Devlin et al. 2019).

    logits_BTV = EncoderMLM(config).apply({"params": params}, tokens, positions, segment_ids, token_types)

tokens int [B, T]; positions int [B, T] (default arange(T) per row); segment_ids int [B, T]
(default: one segment per row); token_types int [B, T] (BERT's sentence A/B ids; default 0).
Attention is bidirectional within a segment: several documents may be packed in a row with segment
ids 1, 2, 3, ... and no token sees another document; 0 marks padding, which only sees padding, so
padding changes nothing in the real tokens' outputs. Returns float32 logits [B, T, vocab_size].

Built from the decoder's layers (lmjax/models/layers.py) with `causal=False`:
- embeddings: token table + learned positions (or RoPE inside attention, `model.positions`) +
  token-type table (`model.type_vocab_size` > 0); in post-norm (BERT, `model.norm_position`) a
  norm follows the sum (`embed_norm`) and each block is norm(x + f(x)); in pre-norm a final norm
  follows the blocks (`final_norm`);
- MLM head, as BERT's `cls.predictions`: `head_dense` [D, D] + GELU + `head_norm`, then the tied
  token table (or `unembed` [D, V]) and an output bias `output_bias` [V].

μP (`model.parameterization: mup`, lmjax/models/mup.py) treats `head_dense` as a hidden matrix.

Parameter names follow the decoder's (`embed/embedding`, `position_embedding`, `layers/...` with a
leading [n_layers] axis when `config.scan_layers`, else `layer_0/...`); every weight carries
logical axis names, so the encoder shards over the same mesh rules.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmjax import flops
from lmjax.config import ModelConfig
from lmjax.models.layers import (
    RESIDUAL_AXES,
    Dense,
    Embed,
    LanguageModel,
    ModelInputError,
    dense_options,
    gelu,
    init_std,
    learned_positions,
    lookup,
    make_norm,
    output_logits,
    partitioned_normal,
)
from lmjax.models.stacking import block_class, run_layer, scan_stack


class EncoderMLM(LanguageModel):
    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        token_types: jax.Array | None = None,
    ) -> jax.Array:
        cfg = self.config
        self._check_inputs(tokens, positions, segment_ids, token_types)
        tokens_BT, segment_ids_BT = tokens, segment_ids
        batch, length = tokens_BT.shape
        positions_BT = positions if positions is not None else jnp.broadcast_to(jnp.arange(length), (batch, length))

        embed = Embed(cfg, name="embed")
        x_BTD = embed(tokens_BT)
        if not cfg.use_rope:
            x_BTD = x_BTD + learned_positions(self, cfg, positions_BT)
        if cfg.type_vocab_size:
            table_init = partitioned_normal(cfg.init_std, (None, "embed"))
            table = self.param("token_type_embedding", table_init, (cfg.type_vocab_size, cfg.d_model), jnp.dtype(cfg.param_dtype))
            types_BT = token_types if token_types is not None else jnp.zeros_like(tokens_BT)
            x_BTD = x_BTD + lookup(table, types_BT).astype(x_BTD.dtype)
        if cfg.post_norm:
            x_BTD = make_norm(cfg, "embed_norm")(x_BTD)
        x_BTD = nn.with_logical_constraint(x_BTD, RESIDUAL_AXES)

        block_cls = block_class(cfg)
        if cfg.scan_layers:
            x_BTD, _ = scan_stack(block_cls, cfg.n_layers)(cfg, causal=False, name="layers")(x_BTD, positions_BT, segment_ids_BT)
        else:
            for i in range(cfg.n_layers):
                x_BTD, _ = run_layer(cfg, block_cls(cfg, causal=False, name=f"layer_{i}"), x_BTD, positions_BT, segment_ids_BT)
        if not cfg.post_norm:
            x_BTD = make_norm(cfg, "final_norm")(x_BTD)

        head_dense = Dense((cfg.d_model,), ("embed", "mlp"), init_std(cfg, "head_dense"), name="head_dense", **dense_options(cfg))
        h_BTD = head_dense(x_BTD)
        h_BTD = nn.with_logical_constraint(gelu(h_BTD, cfg), RESIDUAL_AXES)
        h_BTD = make_norm(cfg, "head_norm")(h_BTD)
        bias_init = nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",))
        output_bias_V = self.param("output_bias", bias_init, (cfg.vocab_size,), jnp.dtype(cfg.param_dtype))
        return output_logits(self, cfg, embed, h_BTD) + output_bias_V.astype(jnp.float32)

    def _check_inputs(self, tokens_BT, positions_BT, segment_ids_BT, token_types_BT) -> None:
        cfg = self.config
        if tokens_BT.ndim != 2 or not jnp.issubdtype(tokens_BT.dtype, jnp.integer):
            raise ModelInputError(f"tokens: expected an integer array [batch, length], got {tokens_BT.dtype} {tokens_BT.shape}")
        for name, array in (("positions", positions_BT), ("segment_ids", segment_ids_BT), ("token_types", token_types_BT)):
            if array is not None and array.shape != tokens_BT.shape:
                raise ModelInputError(f"{name}: expected shape {tokens_BT.shape} (as tokens), got {array.shape}")
        if token_types_BT is not None and not cfg.type_vocab_size:
            raise ModelInputError("token_types: this model has no token-type embeddings (model.type_vocab_size is 0)")
        if not cfg.use_rope and tokens_BT.shape[1] > cfg.max_seq_len:
            raise ModelInputError(f"tokens: length {tokens_BT.shape[1]} exceeds model.max_seq_len ({cfg.max_seq_len})")


# ----------------------------------------------------------------------------- counts (lmjax.flops)


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """See `lmjax.flops.param_counts`; the MLM head's transform and output bias are non-embedding."""
    d = cfg.d_model
    embedding, output_head = flops.embedding_params(cfg), flops.output_head_params(cfg)
    outer_norm = flops.norm_params(cfg)  # embed_norm (post-norm) or final_norm (pre-norm)
    head = d * d + (d if cfg.use_bias else 0) + flops.norm_params(cfg) + cfg.vocab_size
    total = embedding + outer_norm + cfg.n_layers * sum(flops.block_params(cfg).values()) + head + output_head
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding, "output_head": output_head, "active": total}


def forward_terms(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Appendix-F terms of one sequence: the decoder's (attention counted over the full T x T
    scores, as bidirectional attention computes them), the head's D x D transform, and logits at
    every position (the model computes them all, masked or not)."""
    terms = flops.chinchilla_forward_terms(
        seq_len, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.head_size, cfg.d_ff, cfg.vocab_size,
        n_kv_heads=cfg.kv_heads, mlp_matrices=cfg.mlp_matrices,
    )
    terms["mlm_head"] = 2.0 * seq_len * cfg.d_model * cfg.d_model
    return terms
