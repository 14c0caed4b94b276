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

Training does better (`fused_cross_entropy_loss`, what causal_lm and sft call): its loss is a
weighted sum, so the backward's only unknown is one scalar, and dx and dW are computed in the
forward scan from the logits it already has, as Liger-Kernel does; the backward scales them. Three
[tokens, D] x [D, V] matmuls per step, like plain logits, and still no [tokens, V] array kept.

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

from lmjax import sharding
from lmjax.config import ModelConfig
from lmjax.models import cpu_matmul
from lmjax.models.layers import Embed, unembed_matrix
from lmjax.models.mup import logit_multiplier


def fused_cross_entropy(x_ND: jax.Array, w: jax.Array, targets_N: jax.Array, *, chunk_tokens: int,
                        multiplier: float = 1.0, w_layout: str = "dv", matmul: str = "auto") -> tuple[jax.Array, jax.Array]:
    """Per-token cross-entropy and log-partition (float32 [N] each) of the logits
    `multiplier * x_ND @ W` against int `targets_N`, `chunk_tokens` tokens at a time.

    `w` is W in the compute dtype, [D, V] (`w_layout="dv"`) or [V, D] (`"vd"`, a tied table; no
    transpose is made). Matches `jax.nn.logsumexp(logits) - logits[target]` in values and gradients
    (x and w) up to float32 rounding of the summation order.
    """
    chunked = _Chunked(x_ND, chunk_tokens, w_layout)
    ce_Cc, log_z_Cc = _chunked_cross_entropy(float(multiplier), w_layout, matmul, chunked.x_CcD, w, chunked.split(targets_N))
    return chunked.join(ce_Cc), chunked.join(log_z_Cc)


def fused_cross_entropy_loss(x_ND: jax.Array, w: jax.Array, targets_N: jax.Array, weights_N: jax.Array, *,
                             z_loss: float, chunk_tokens: int, multiplier: float = 1.0,
                             w_layout: str = "dv", matmul: str = "auto") -> tuple[jax.Array, jax.Array, jax.Array]:
    """(loss, ce_N, log_z_N) for training: loss = sum_n weights_n (ce_n + z_loss log_z_n^2), a float32
    scalar, with the per-token values of `fused_cross_entropy`, which here carry no gradient.

    The loss's gradients (x and w; not the weights) are computed in the forward pass, chunk by chunk
    while the logits are at hand (as Liger-Kernel's fused linear cross-entropy does): the cotangent of
    a sum is one scalar g, so d logits = g (softmax s_n - onehot w_n) with s_n = w_n (1 + 2 z_loss
    log_z_n), all known before the backward. That saves the backward's recomputation of the logits,
    one [N, D] x [D, V] matmul of four; the residuals are dx [N, D] and a float32 dW. The same values
    and gradients as `fused_cross_entropy` under this objective, up to float32 rounding.
    """
    chunked = _Chunked(x_ND, chunk_tokens, w_layout)
    loss, ce_Cc, log_z_Cc = _chunked_loss(float(multiplier), w_layout, matmul, float(z_loss), chunked.x_CcD, w,
                                          chunked.split(targets_N), chunked.split(weights_N.astype(jnp.float32)))
    # _chunked_loss's backward reads only the loss's cotangent: no gradient may reach the others.
    return loss, jax.lax.stop_gradient(chunked.join(ce_Cc)), jax.lax.stop_gradient(chunked.join(log_z_Cc))


def output_cross_entropy(module: nn.Module, config: ModelConfig, embed: Embed, x_BTD: jax.Array,
                         targets_BT: jax.Array, weights_BT: jax.Array | None = None,
                         z_loss: float = 0.0) -> tuple[jax.Array, ...]:
    """A decoder's (cross-entropy, log Z), float32 [B, T] each, from its final hidden states: the
    readout of `layers.output_logits` (the tied table of `embed`, or `module`'s `unembed` [D, V];
    μP's logit multiplier) without its logits. With `weights_BT`, (loss, cross-entropy, log Z) of
    `fused_cross_entropy_loss` instead."""
    batch, length, d_model = x_BTD.shape
    if config.tie_embeddings:  # the dtypes of `Embed.attend` and `output_logits`
        w, layout = embed.embedding.astype(jnp.dtype(config.dtype)), "vd"
    else:
        w, layout = unembed_matrix(module, config).astype(x_BTD.dtype), "dv"
    x_ND, targets_N = x_BTD.reshape(batch * length, d_model), targets_BT.reshape(-1)
    options = dict(chunk_tokens=config.loss_chunk_tokens, multiplier=logit_multiplier(config), w_layout=layout,
                   matmul=config.matmul)
    as_BT = lambda a_N: nn.with_logical_constraint(a_N.reshape(batch, length), ("batch", "length"))  # noqa: E731
    if weights_BT is None:
        ce_N, log_z_N = fused_cross_entropy(x_ND, w, targets_N, **options)
        return as_BT(ce_N), as_BT(log_z_N)
    loss, ce_N, log_z_N = fused_cross_entropy_loss(x_ND, w, targets_N, weights_BT.reshape(-1), z_loss=z_loss, **options)
    return loss, as_BT(ce_N), as_BT(log_z_N)


class _Chunked:
    """x [N, D] as [C, c, D] chunks (the strided split of the module docstring), with the same split
    (`split`) and its inverse (`join`) for per-token arrays [N]. Padding tokens are zeros."""

    def __init__(self, x_ND: jax.Array, chunk_tokens: int, w_layout: str):
        if w_layout not in ("dv", "vd"):  # also the einsum operand string of w
            raise ValueError(f"w_layout: expected 'dv' or 'vd', got {w_layout!r}")
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        self.n_tokens, d_model = x_ND.shape
        self.n_chunks = -(-self.n_tokens // chunk_tokens)
        self.per_chunk = -(-self.n_tokens // self.n_chunks)  # <= chunk_tokens; pads fewer than n_chunks tokens
        self.padding = self.n_chunks * self.per_chunk - self.n_tokens
        if self.padding:
            x_ND = jnp.pad(x_ND, ((0, self.padding), (0, 0)))
        # [N, D] -> [c, C, D] keeps each device's contiguous rows in the c axis; the scan runs over C.
        self.x_CcD = x_ND.reshape(self.per_chunk, self.n_chunks, d_model).swapaxes(0, 1)

    def split(self, a_N: jax.Array) -> jax.Array:
        if self.padding:
            a_N = jnp.pad(a_N, (0, self.padding))
        return a_N.reshape(self.per_chunk, self.n_chunks).swapaxes(0, 1)

    def join(self, a_Cc: jax.Array) -> jax.Array:
        return a_Cc.swapaxes(0, 1).reshape(-1)[: self.n_tokens]


def _einsum(matmul: str, spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """The 2-D product `spec` ("ij,jk->ik" up to operand order: one contracted index, the output the
    two kept ones in operand order) in float32, through the MKL kernel where `matmul` is auto and it
    applies (lmjax/models/cpu_matmul.py), else XLA's dot."""
    if matmul == "auto":
        operands, _ = spec.split("->")
        lhs, rhs = operands.split(",")
        (k,) = set(lhs) & set(rhs)
        product = cpu_matmul.product(a, b, trans_a=lhs[0] == k, trans_b=rhs[1] == k)
        if product is not None:
            return product
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _chunk_logits(multiplier: float, w_layout: str, matmul: str, x_cD: jax.Array, w: jax.Array) -> jax.Array:
    logits_cV = _einsum(matmul, f"cd,{w_layout}->cv", x_cD, w)
    if multiplier != 1.0:  # skipped at 1.0, as in layers.output_logits
        logits_cV = logits_cV * multiplier
    return nn.with_logical_constraint(logits_cV, ("batch", "vocab"))


def _is_target(logits_cV: jax.Array, targets_c: jax.Array) -> jax.Array:
    """bool [c, V] one-hot of the targets, from an iota (no gather from a vocab-sharded array)."""
    return jax.lax.broadcasted_iota(jnp.int32, logits_cV.shape, 1) == targets_c[:, None]


def _target_logits(logits_cV: jax.Array, is_target_cV: jax.Array, targets_c: jax.Array) -> jax.Array:
    """[c] each token's target logit; 0 for a target outside the vocabulary (padding), as the one-hot gives.

    A gather reads c numbers; the one-hot's masked sum writes and reads a [c, V] array (2% of the CPU
    bench step, experiments/bench/README.md, twelfth round). Over a vocab-split mesh, the masked sum: it
    needs no gather across the devices holding the vocabulary."""
    if sharding.splits("vocab"):
        return jnp.sum(jnp.where(is_target_cV, logits_cV, 0.0), axis=-1)
    V = logits_cV.shape[-1]
    picked_c = jnp.take_along_axis(logits_cV, jnp.clip(targets_c, 0, V - 1)[:, None], axis=-1)[:, 0]
    return jnp.where((targets_c >= 0) & (targets_c < V), picked_c, 0.0)


def _chunk_cross_entropy(multiplier, w_layout, matmul, x_cD, w, targets_c):
    """One chunk's (logits, target one-hot, cross-entropy, log Z)."""
    logits_cV = _chunk_logits(multiplier, w_layout, matmul, x_cD, w)
    is_target_cV = _is_target(logits_cV, targets_c)
    log_z_c = jax.nn.logsumexp(logits_cV, axis=-1)
    return logits_cV, is_target_cV, log_z_c - _target_logits(logits_cV, is_target_cV, targets_c), log_z_c


def _chunk_gradients(multiplier, w_layout, matmul, x_cD, w, logits_cV, is_target_cV, log_z_c, softmax_weight_c, target_weight_c):
    """One chunk's (dx, dW as [D, V] float32) for d logits = softmax x softmax_weight - onehot x
    target_weight (per token): the cross-entropy's with (d ce + d log Z, d ce)."""
    probs_cV = jnp.exp(logits_cV - log_z_c[:, None])
    dlogits_cV = probs_cV * softmax_weight_c[:, None] - jnp.where(is_target_cV, target_weight_c[:, None], 0.0)
    if multiplier != 1.0:
        dlogits_cV = dlogits_cV * multiplier
    dlogits_cV = dlogits_cV.astype(x_cD.dtype)  # matmuls in the compute dtype, float32 accumulation
    dx_cD = _einsum(matmul, f"cv,{w_layout}->cd", dlogits_cV, w)
    # dW as [D, V] in either layout: XLA:CPU's "cd,cv->dv" runs ~1.2x its "cd,cv->vd".
    dw_DV = _einsum(matmul, "cd,cv->dv", x_cD, dlogits_cV)
    return dx_cD.astype(x_cD.dtype), dw_DV


def _zeros_DV(w_layout, w) -> jax.Array:
    return jnp.zeros(w.shape if w_layout == "dv" else w.shape[::-1], jnp.float32)


def _in_layout(w_layout, dw_DV_f32, dtype) -> jax.Array:
    return (dw_DV_f32 if w_layout == "dv" else dw_DV_f32.T).astype(dtype)


def _forward(multiplier, w_layout, matmul, x_CcD, w, targets_Cc):
    def step(_, chunk):
        x_cD, targets_c = chunk
        _, _, ce_c, log_z_c = _chunk_cross_entropy(multiplier, w_layout, matmul, x_cD, w, targets_c)
        return None, (ce_c, log_z_c)

    _, (ce_Cc, log_z_Cc) = jax.lax.scan(step, None, (x_CcD, targets_Cc))
    return ce_Cc, log_z_Cc


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _chunked_cross_entropy(multiplier, w_layout, matmul, x_CcD, w, targets_Cc):
    return _forward(multiplier, w_layout, matmul, x_CcD, w, targets_Cc)


def _chunked_fwd(multiplier, w_layout, matmul, x_CcD, w, targets_Cc):
    ce_Cc, log_z_Cc = _forward(multiplier, w_layout, matmul, x_CcD, w, targets_Cc)
    return (ce_Cc, log_z_Cc), (x_CcD, w, targets_Cc, log_z_Cc)


def _chunked_bwd(multiplier, w_layout, matmul, residuals, cotangents):
    x_CcD, w, targets_Cc, log_z_Cc = residuals
    dce_Cc, dlog_z_Cc = cotangents

    def step(dw_DV_f32, chunk):
        x_cD, targets_c, log_z_c, dce_c, dlog_z_c = chunk
        logits_cV = _chunk_logits(multiplier, w_layout, matmul, x_cD, w)  # the forward's, recomputed
        dx_cD, dw_DV = _chunk_gradients(multiplier, w_layout, matmul, x_cD, w, logits_cV, _is_target(logits_cV, targets_c),
                                        log_z_c, dce_c + dlog_z_c, dce_c)
        return dw_DV_f32 + dw_DV, dx_cD

    chunks = (x_CcD, targets_Cc, log_z_Cc, dce_Cc.astype(jnp.float32), dlog_z_Cc.astype(jnp.float32))
    dw_DV_f32, dx_CcD = jax.lax.scan(step, _zeros_DV(w_layout, w), chunks)
    return dx_CcD, _in_layout(w_layout, dw_DV_f32, w.dtype), None


_chunked_cross_entropy.defvjp(_chunked_fwd, _chunked_bwd)


# ----------------------------------------------------------------------------- the training loss


def _weighted_sum(z_loss, weights_Cc, ce_Cc, log_z_Cc) -> jax.Array:
    loss = jnp.sum(weights_Cc * ce_Cc)
    return loss + z_loss * jnp.sum(weights_Cc * jnp.square(log_z_Cc)) if z_loss else loss


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _chunked_loss(multiplier, w_layout, matmul, z_loss, x_CcD, w, targets_Cc, weights_Cc):
    ce_Cc, log_z_Cc = _forward(multiplier, w_layout, matmul, x_CcD, w, targets_Cc)
    return _weighted_sum(z_loss, weights_Cc, ce_Cc, log_z_Cc), ce_Cc, log_z_Cc


def _chunked_loss_fwd(multiplier, w_layout, matmul, z_loss, x_CcD, w, targets_Cc, weights_Cc):
    """The forward, and the loss's dx and dW from each chunk's logits while they are at hand."""
    def step(dw_DV_f32, chunk):
        x_cD, targets_c, weights_c = chunk
        logits_cV, is_target_cV, ce_c, log_z_c = _chunk_cross_entropy(multiplier, w_layout, matmul, x_cD, w, targets_c)
        softmax_weight_c = weights_c * (1.0 + 2.0 * z_loss * log_z_c)  # d loss / d log_z_c
        dx_cD, dw_DV = _chunk_gradients(multiplier, w_layout, matmul, x_cD, w, logits_cV, is_target_cV, log_z_c,
                                        softmax_weight_c, weights_c)
        return dw_DV_f32 + dw_DV, (ce_c, log_z_c, dx_cD)

    dw_DV_f32, (ce_Cc, log_z_Cc, dx_CcD) = jax.lax.scan(step, _zeros_DV(w_layout, w), (x_CcD, targets_Cc, weights_Cc))
    w_dtype = jnp.zeros((0,), w.dtype)  # dW's dtype, carried as an empty residual
    return (_weighted_sum(z_loss, weights_Cc, ce_Cc, log_z_Cc), ce_Cc, log_z_Cc), (dx_CcD, dw_DV_f32, w_dtype)


def _chunked_loss_bwd(multiplier, w_layout, matmul, z_loss, residuals, cotangents):
    dx_CcD, dw_DV_f32, w_dtype = residuals
    dloss = cotangents[0]  # ce and log_z leave fused_cross_entropy_loss through stop_gradient
    return (dloss * dx_CcD).astype(dx_CcD.dtype), _in_layout(w_layout, dloss * dw_DV_f32, w_dtype.dtype), None, None


_chunked_loss.defvjp(_chunked_loss_fwd, _chunked_loss_bwd)
