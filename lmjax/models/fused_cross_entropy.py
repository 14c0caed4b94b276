"""Cross-entropy fused with the unembedding: no float32 [tokens, vocab] logits kept for the backward.

With plain logits, a decoder's last matmul writes float32 [B, T, V] logits, and autodiff of the loss
keeps them (or the softmax) alive until the backward pass: at V = 32k-256k the largest activation of
the model. Here (`model.loss_chunk_tokens`, objectives causal_lm and sft) the model returns the
per-token cross-entropy and log-partition instead, computed a chunk of tokens at a time:

- the forward pass is one `lax.scan` over chunks; each step computes the chunk's float32 logits
  (x @ W with float32 accumulation, times μP's logit multiplier), their logsumexp and the target
  logit, and keeps only those two numbers per token;
- the backward pass (a `jax.custom_vjp`) is a second scan that recomputes each chunk's logits, turns
  them into d logits = softmax * (d ce + d log_z) - onehot(target) * d ce (the z-loss reaches log_z's
  cotangent), and accumulates dW in float32 while writing dx chunk by chunk. The residuals are x, W,
  the targets and log_z: nothing of size [tokens, vocab].

The cost is one more [tokens, D] x [D, V] matmul (the recomputed logits) per training step; the
memory is a few [chunk, V] float32 tiles and a float32 [D, V] gradient accumulator.

Chunk m holds the tokens n with n mod n_chunks == m (a strided split): the token axis of x is the
flattened, batch-sharded [B, T], so every chunk spreads over all data-parallel devices like x itself
and the scan never slices a sharded axis. When `chunk_tokens` does not divide N, the chunks are
evened out (at most `chunk_tokens` each) and the few padding tokens are sliced off; their zero
cotangents add nothing to the gradients.

Shape suffixes: N tokens, D d_model, V vocab, C chunks, c tokens per chunk.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmjax.config import ModelConfig
from lmjax.models.layers import Embed, unembed_matrix
from lmjax.models.mup import logit_multiplier


def fused_cross_entropy(x_ND: jax.Array, w: jax.Array, targets_N: jax.Array, *, chunk_tokens: int,
                        multiplier: float = 1.0, w_layout: str = "dv") -> tuple[jax.Array, jax.Array]:
    """Per-token cross-entropy and log-partition (float32 [N] each) of the logits
    `multiplier * x_ND @ W` against int `targets_N`, `chunk_tokens` tokens at a time.

    `w` is W in the compute dtype, [D, V] (`w_layout="dv"`) or [V, D] (`"vd"`, a tied table; no
    transpose is made). Matches `jax.nn.logsumexp(logits) - logits[target]` in values and gradients
    (x and w) up to float32 rounding of the summation order.
    """
    if w_layout not in ("dv", "vd"):  # also the einsum operand string of w
        raise ValueError(f"w_layout: expected 'dv' or 'vd', got {w_layout!r}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    n_tokens, d_model = x_ND.shape
    n_chunks = -(-n_tokens // chunk_tokens)
    per_chunk = -(-n_tokens // n_chunks)  # <= chunk_tokens; pads fewer than n_chunks tokens
    padding = n_chunks * per_chunk - n_tokens
    if padding:
        x_ND = jnp.pad(x_ND, ((0, padding), (0, 0)))
        targets_N = jnp.pad(targets_N, (0, padding))
    # [N, D] -> [c, C, D] keeps each device's contiguous rows in the c axis; the scan runs over C.
    x_CcD = x_ND.reshape(per_chunk, n_chunks, d_model).swapaxes(0, 1)
    targets_Cc = targets_N.reshape(per_chunk, n_chunks).swapaxes(0, 1)
    ce_Cc, log_z_Cc = _chunked_cross_entropy(float(multiplier), w_layout, x_CcD, w, targets_Cc)
    unchunk = lambda a_Cc: a_Cc.swapaxes(0, 1).reshape(-1)[:n_tokens]  # noqa: E731
    return unchunk(ce_Cc), unchunk(log_z_Cc)


def output_cross_entropy(module: nn.Module, config: ModelConfig, embed: Embed, x_BTD: jax.Array,
                         targets_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A decoder's (cross-entropy, log Z), float32 [B, T] each, from its final hidden states: the
    readout of `layers.output_logits` (the tied table of `embed`, or `module`'s `unembed` [D, V];
    μP's logit multiplier) without its logits."""
    batch, length, d_model = x_BTD.shape
    if config.tie_embeddings:  # the dtypes of `Embed.attend` and `output_logits`
        w, layout = embed.embedding.astype(jnp.dtype(config.dtype)), "vd"
    else:
        w, layout = unembed_matrix(module, config).astype(x_BTD.dtype), "dv"
    ce_N, log_z_N = fused_cross_entropy(
        x_BTD.reshape(batch * length, d_model), w, targets_BT.reshape(-1), chunk_tokens=config.loss_chunk_tokens,
        multiplier=logit_multiplier(config), w_layout=layout,
    )
    as_BT = lambda a_N: nn.with_logical_constraint(a_N.reshape(batch, length), ("batch", "length"))  # noqa: E731
    return as_BT(ce_N), as_BT(log_z_N)


def _chunk_logits(multiplier: float, w_layout: str, x_cD: jax.Array, w: jax.Array) -> jax.Array:
    logits_cV = jnp.einsum(f"cd,{w_layout}->cv", x_cD, w, preferred_element_type=jnp.float32)
    if multiplier != 1.0:  # skipped at 1.0, as in layers.output_logits
        logits_cV = logits_cV * multiplier
    return nn.with_logical_constraint(logits_cV, ("batch", "vocab"))


def _is_target(logits_cV: jax.Array, targets_c: jax.Array) -> jax.Array:
    """bool [c, V] one-hot of the targets, from an iota (no gather from a vocab-sharded array)."""
    return jax.lax.broadcasted_iota(jnp.int32, logits_cV.shape, 1) == targets_c[:, None]


def _forward(multiplier, w_layout, x_CcD, w, targets_Cc):
    def step(_, chunk):
        x_cD, targets_c = chunk
        logits_cV = _chunk_logits(multiplier, w_layout, x_cD, w)
        log_z_c = jax.nn.logsumexp(logits_cV, axis=-1)
        target_logit_c = jnp.sum(jnp.where(_is_target(logits_cV, targets_c), logits_cV, 0.0), axis=-1)
        return None, (log_z_c - target_logit_c, log_z_c)

    _, (ce_Cc, log_z_Cc) = jax.lax.scan(step, None, (x_CcD, targets_Cc))
    return ce_Cc, log_z_Cc


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chunked_cross_entropy(multiplier, w_layout, x_CcD, w, targets_Cc):
    return _forward(multiplier, w_layout, x_CcD, w, targets_Cc)


def _chunked_fwd(multiplier, w_layout, x_CcD, w, targets_Cc):
    ce_Cc, log_z_Cc = _forward(multiplier, w_layout, x_CcD, w, targets_Cc)
    return (ce_Cc, log_z_Cc), (x_CcD, w, targets_Cc, log_z_Cc)


def _chunked_bwd(multiplier, w_layout, residuals, cotangents):
    x_CcD, w, targets_Cc, log_z_Cc = residuals
    dce_Cc, dlog_z_Cc = cotangents

    def step(dw_f32, chunk):
        x_cD, targets_c, log_z_c, dce_c, dlog_z_c = chunk
        logits_cV = _chunk_logits(multiplier, w_layout, x_cD, w)
        probs_cV = jnp.exp(logits_cV - log_z_c[:, None])  # the forward's softmax, recomputed
        dlogits_cV = probs_cV * (dce_c + dlog_z_c)[:, None] - jnp.where(_is_target(logits_cV, targets_c), dce_c[:, None], 0.0)
        if multiplier != 1.0:
            dlogits_cV = dlogits_cV * multiplier
        # Matmuls in the compute dtype with float32 accumulation, like the forward's.
        dlogits_cV = dlogits_cV.astype(x_cD.dtype)
        dx_cD = jnp.einsum(f"cv,{w_layout}->cd", dlogits_cV, w, preferred_element_type=jnp.float32)
        dw_f32 = dw_f32 + jnp.einsum(f"cd,cv->{w_layout}", x_cD, dlogits_cV, preferred_element_type=jnp.float32)
        return dw_f32, dx_cD.astype(x_cD.dtype)

    chunks = (x_CcD, targets_Cc, log_z_Cc, dce_Cc.astype(jnp.float32), dlog_z_Cc.astype(jnp.float32))
    dw_f32, dx_CcD = jax.lax.scan(step, jnp.zeros(w.shape, jnp.float32), chunks)
    return dx_CcD, dw_f32.astype(w.dtype), None


_chunked_cross_entropy.defvjp(_chunked_fwd, _chunked_bwd)
