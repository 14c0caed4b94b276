"""Blockwise (flash-style) attention in pure JAX: memory linear in the sequence length.

`jax.nn.dot_product_attention` on XLA:CPU materialises the [B, N, T, S] scores (and, for packed rows,
a [B, 1, T, S] mask), and its autodiff saves the probabilities for the backward pass, so memory grows
with T^2. This is FlashAttention-2 (Dao 2023) written with XLA ops instead of a kernel:

- the score matrix is cut into [block_q, block_k] tiles; only the tiles that can hold a visible entry
  (causal: not above the diagonal; sliding window: not left of the band) are visited, from a static
  list of (query block, key block) pairs computed at trace time, so skipped tiles cost nothing;
- the forward pass keeps a running row maximum and row sum (online softmax, float32) per query row,
  and saves only q, k, v, the output and the per-row logsumexp;
- the backward pass (a `jax.custom_vjp`) recomputes each tile's probabilities from the logsumexp, so
  neither pass holds more than a few tiles of scores;
- grouped-query heads stay grouped: q is viewed as [B, K, G, T, H] (query head n = k * G + g reads
  KV head k = n // G, jax's convention) and every contraction batches over (B, K), so K/V are never
  repeated;
- the mask of a tile (causal, window, padding, segment ids) is built from positions and the tile's
  segment ids inside the loop, never as a [T, S] array.

Each pass is one `lax.scan` over the pair list, so the compiled program does not grow with T.
Lengths that are not a multiple of the blocks are padded; padded keys are masked, padded query rows
are sliced off (their output cotangent is zero, so they add nothing to the gradients).

Shape suffixes: B batch, T query length, S key length, N query heads, K key/value heads,
G = N // K query heads per KV head, H head_dim, P number of visited tile pairs.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from lmjax.models import cpu_kernels
from lmjax.models.rotary import rotate

# Masked scores: finite (like jax.nn.dot_product_attention's -0.7 * float32 max) rather than -inf, so
# a row with no visible key in a tile gives exp(0) = 1 there instead of exp(-inf + inf) = NaN; any
# visible key later raises the row maximum and its rescale factor exp(MASK - max) wipes them out.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
ATTENTION_OUT, ATTENTION_LSE = "blockwise_attention_out", "blockwise_attention_lse"  # checkpoint names


@dataclasses.dataclass(frozen=True)
class _Spec:
    """The static (hashable) part of a call: custom_vjp's non-differentiable argument."""

    causal: bool
    scale: float
    local_window: int | None
    block_q: int
    block_k: int
    q_len: int  # T before padding
    kv_len: int  # S before padding


def visible_block_pairs(spec: _Spec) -> tuple[np.ndarray, np.ndarray]:
    """int32 [P] query-block and key-block indices of the tiles with at least one key visible to some
    query by position (causal / window; segment ids are only known at run time), query-block major."""
    pairs = []
    for qi in range(-(-spec.q_len // spec.block_q)):
        i_lo, i_hi = qi * spec.block_q, min((qi + 1) * spec.block_q, spec.q_len) - 1  # real query rows of the block
        for kj in range(-(-spec.kv_len // spec.block_k)):
            j_lo, j_hi = kj * spec.block_k, min((kj + 1) * spec.block_k, spec.kv_len) - 1
            if spec.causal and i_hi < j_lo:  # every key after every query
                continue
            if spec.local_window is not None and i_lo - j_hi >= spec.local_window:  # every key out of every window
                continue
            pairs.append((qi, kj))
    q_blocks_P, k_blocks_P = np.array(pairs, np.int32).reshape(-1, 2).T
    return q_blocks_P, k_blocks_P


def _pad_axis(x: jax.Array, axis: int, length: int, value=0) -> jax.Array:
    if x.shape[axis] == length:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def _padded(n: int, block: int) -> int:
    return -(-n // block) * block


def _grouped_queries(x_BTNH: jax.Array, kv_heads: int, padded_len: int) -> jax.Array:
    """[B, T, N, H] -> [B, K, G, T_pad, H]: row blocks are then contiguous slices per (b, k, g), and the
    tile contractions are batched matmuls over (B, K) without per-step transposes."""
    B, T, N, H = x_BTNH.shape
    x_BKGTH = x_BTNH.reshape(B, T, kv_heads, N // kv_heads, H).transpose(0, 2, 3, 1, 4)
    return _pad_axis(x_BKGTH, 3, padded_len)


def _kv_heads_first(x_BSKH: jax.Array, padded_len: int) -> jax.Array:
    return _pad_axis(x_BSKH.transpose(0, 2, 1, 3), 2, padded_len)  # [B, K, S_pad, H]


def _segments(segment_ids_BT: jax.Array | None, spec: _Spec):
    """Padded query and key segment ids, or (None, None). Padded queries get -1 and padded keys -2, so
    they match nothing (padded keys are masked by position as well)."""
    if segment_ids_BT is None:
        return None, None
    seg_q_BT = _pad_axis(segment_ids_BT.astype(jnp.int32), 1, _padded(spec.q_len, spec.block_q), -1)
    seg_k_BS = _pad_axis(segment_ids_BT.astype(jnp.int32), 1, _padded(spec.kv_len, spec.block_k), -2)
    return seg_q_BT, seg_k_BS


def _tiled_inputs(spec: _Spec, q_BTNH, k_BSKH, v_BSKH, segment_ids_BT):
    """Both passes' layout: q [B, K, G, T_pad, H], k and v [B, K, S_pad, H], padded segment ids."""
    K = k_BSKH.shape[2]
    T_pad, S_pad = _padded(spec.q_len, spec.block_q), _padded(spec.kv_len, spec.block_k)
    return (_grouped_queries(q_BTNH, K, T_pad), _kv_heads_first(k_BSKH, S_pad), _kv_heads_first(v_BSKH, S_pad),
            *_segments(segment_ids_BT, spec))


def _row_block(spec: _Spec, x_BKGT_, qi) -> jax.Array:
    """Query block `qi` of a [B, K, G, T_pad, ...] array."""
    return jax.lax.dynamic_slice_in_dim(x_BKGT_, qi * spec.block_q, spec.block_q, axis=3)


def _key_block(spec: _Spec, x_BKS_, kj) -> jax.Array:
    """Key block `kj` of a [B, K, S_pad, ...] array."""
    return jax.lax.dynamic_slice_in_dim(x_BKS_, kj * spec.block_k, spec.block_k, axis=2)


def _tile_mask(spec: _Spec, qi, kj, seg_q_BT, seg_k_BS) -> jax.Array:
    """bool [B or 1, block_q, block_k]: the visible entries of tile (qi, kj)."""
    q_pos_Q1 = qi * spec.block_q + jnp.arange(spec.block_q)[:, None]
    k_pos_1C = kj * spec.block_k + jnp.arange(spec.block_k)[None, :]
    mask_QC = k_pos_1C < spec.kv_len
    if spec.causal:
        mask_QC = mask_QC & (k_pos_1C <= q_pos_Q1)
    if spec.local_window is not None:
        mask_QC = mask_QC & (q_pos_Q1 - k_pos_1C < spec.local_window)
    mask_BQC = mask_QC[None]
    if seg_q_BT is not None:
        seg_q_BQ = jax.lax.dynamic_slice_in_dim(seg_q_BT, qi * spec.block_q, spec.block_q, axis=1)
        seg_k_BC = jax.lax.dynamic_slice_in_dim(seg_k_BS, kj * spec.block_k, spec.block_k, axis=1)
        mask_BQC = mask_BQC & (seg_q_BQ[:, :, None] == seg_k_BC[:, None, :])
    return mask_BQC


def _tile_scores(spec: _Spec, q_BKGQH, k_BKCH, mask_BQC) -> jax.Array:
    """float32 masked, scaled scores [B, K, G, block_q, block_k] of one tile."""
    s_BKGQC = jnp.einsum("bkgqh,bkch->bkgqc", q_BKGQH, k_BKCH, preferred_element_type=jnp.float32) * spec.scale
    return jnp.where(mask_BQC[:, None, None], s_BKGQC, MASK_VALUE)


def _forward(spec: _Spec, q_BTNH, k_BSKH, v_BSKH, segment_ids_BT):
    """(output [B, T, N, H] in q's dtype, logsumexp float32 [B, K, G, T_pad])."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    q_BKGTH, k_BKSH, v_BKSH, seg_q_BT, seg_k_BS = _tiled_inputs(spec, q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
    T_pad = q_BKGTH.shape[3]

    def step(carry, pair):
        m_BKGT, l_BKGT, acc_BKGTH = carry
        qi, kj = pair
        q0 = qi * spec.block_q
        q_BKGQH, k_BKCH, v_BKCH = _row_block(spec, q_BKGTH, qi), _key_block(spec, k_BKSH, kj), _key_block(spec, v_BKSH, kj)
        s_BKGQC = _tile_scores(spec, q_BKGQH, k_BKCH, _tile_mask(spec, qi, kj, seg_q_BT, seg_k_BS))
        m_old_BKGQ, l_old_BKGQ, acc_old_BKGQH = (_row_block(spec, x, qi) for x in (m_BKGT, l_BKGT, acc_BKGTH))
        m_new_BKGQ = jnp.maximum(m_old_BKGQ, s_BKGQC.max(axis=-1))
        alpha_BKGQ = jnp.exp(m_old_BKGQ - m_new_BKGQ)  # rescales what earlier key blocks summed
        p_BKGQC = jnp.exp(s_BKGQC - m_new_BKGQ[..., None])
        l_new_BKGQ = alpha_BKGQ * l_old_BKGQ + p_BKGQC.sum(axis=-1)
        pv_BKGQH = jnp.einsum("bkgqc,bkch->bkgqh", p_BKGQC.astype(v_BKCH.dtype), v_BKCH, preferred_element_type=jnp.float32)
        acc_new_BKGQH = alpha_BKGQ[..., None] * acc_old_BKGQH + pv_BKGQH
        m_BKGT = jax.lax.dynamic_update_slice_in_dim(m_BKGT, m_new_BKGQ, q0, axis=3)
        l_BKGT = jax.lax.dynamic_update_slice_in_dim(l_BKGT, l_new_BKGQ, q0, axis=3)
        acc_BKGTH = jax.lax.dynamic_update_slice_in_dim(acc_BKGTH, acc_new_BKGQH, q0, axis=3)
        return (m_BKGT, l_BKGT, acc_BKGTH), None

    G = N // K
    init = (jnp.full((B, K, G, T_pad), MASK_VALUE, jnp.float32), jnp.zeros((B, K, G, T_pad), jnp.float32),
            jnp.zeros((B, K, G, T_pad, H), jnp.float32))
    (m_BKGT, l_BKGT, acc_BKGTH), _ = jax.lax.scan(step, init, visible_block_pairs(spec))
    # A row no visited tile covers keeps l = 0 (only padding can, and only with odd block sizes);
    # dividing by 1 leaves its zero accumulator instead of 0 / 0.
    l_BKGT = jnp.where(l_BKGT == 0.0, 1.0, l_BKGT)
    out_BKGTH = acc_BKGTH / l_BKGT[..., None]
    out_BTNH = out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T_pad, N, H)[:, :T].astype(q_BTNH.dtype)
    return out_BTNH, m_BKGT + jnp.log(l_BKGT)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(spec: _Spec, q_BTNH, k_BSKH, v_BSKH, segment_ids_BT):
    return _forward(spec, q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)[0]


def _attention_fwd(spec: _Spec, q_BTNH, k_BSKH, v_BSKH, segment_ids_BT):
    out_BTNH, lse_BKGT = _forward(spec, q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
    # Named so that a remat policy can keep them (`model.remat: dots` does): otherwise the backward
    # of a rematerialised block reruns this whole forward scan to get them back.
    out_BTNH, lse_BKGT = checkpoint_name(out_BTNH, ATTENTION_OUT), checkpoint_name(lse_BKGT, ATTENTION_LSE)
    return out_BTNH, (q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, out_BTNH, lse_BKGT)


def _attention_bwd(spec: _Spec, residuals, dout_BTNH):
    q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, out_BTNH, lse_BKGT = residuals
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    G = N // K
    q_BKGTH, k_BKSH, v_BKSH, seg_q_BT, seg_k_BS = _tiled_inputs(spec, q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
    T_pad, S_pad = q_BKGTH.shape[3], k_BKSH.shape[2]
    kT_BKHS = k_BKSH.swapaxes(2, 3)  # once here rather than one copy per tile for dq's matmul
    do_BKGTH = _grouped_queries(dout_BTNH.astype(q_BTNH.dtype), K, T_pad)  # padded rows: zero cotangent
    # delta_i = sum_j P_ij dP_ij = dO_i . O_i: the softmax backward's row term, computed once (FA-2).
    delta_BTN = jnp.sum(dout_BTNH.astype(jnp.float32) * out_BTNH.astype(jnp.float32), axis=-1)
    delta_BKGT = _pad_axis(delta_BTN.reshape(B, T, K, G).transpose(0, 2, 3, 1), 3, T_pad)

    # Each tile is computed transposed, keys x queries: XLA:CPU's batched matmul wants its lhs contracted
    # on the minor axis, so dV = P^T dO and dK = dS^T Q in the [query, key] orientation made it write
    # transposed copies of P and dS (two strided passes over every tile, 9% of the backward at T=2,048);
    # this way only k is transposed, once, and dQ comes out as dQ^T = K^T dS^T.
    def step(carry, pair):
        dqT_BKHGT, dk_BKSH, dv_BKSH = carry
        qi, kj = pair
        q0, k0 = qi * spec.block_q, kj * spec.block_k
        q_BKGQH, do_BKGQH, lse_BKGQ, delta_BKGQ = (_row_block(spec, x, qi) for x in (q_BKGTH, do_BKGTH, lse_BKGT, delta_BKGT))
        k_BKCH, v_BKCH = _key_block(spec, k_BKSH, kj), _key_block(spec, v_BKSH, kj)
        kT_BKHC = jax.lax.dynamic_slice_in_dim(kT_BKHS, k0, spec.block_k, axis=3)
        mask_B1C1Q = _tile_mask(spec, qi, kj, seg_q_BT, seg_k_BS).swapaxes(-1, -2)[:, None, :, None, :]
        sT_BKCGQ = jnp.einsum("bkch,bkgqh->bkcgq", k_BKCH, q_BKGQH, preferred_element_type=jnp.float32) * spec.scale
        sT_BKCGQ = jnp.where(mask_B1C1Q, sT_BKCGQ, MASK_VALUE)
        pT_BKCGQ = jnp.exp(sT_BKCGQ - lse_BKGQ[:, :, None])  # the forward's probabilities, recomputed
        # Contracting over (g, q) sums the G query heads that share a KV head: GQA's gradient reduction.
        dv_BKCH = jnp.einsum("bkcgq,bkgqh->bkch", pT_BKCGQ.astype(do_BKGQH.dtype), do_BKGQH, preferred_element_type=jnp.float32)
        dpT_BKCGQ = jnp.einsum("bkch,bkgqh->bkcgq", v_BKCH, do_BKGQH, preferred_element_type=jnp.float32)
        # Masked scores were replaced by a constant: no gradient reaches them (matters only for rows
        # with no visible key in the tile, whose p is 1 there instead of 0).
        dsT_BKCGQ = jnp.where(mask_B1C1Q, pT_BKCGQ * (dpT_BKCGQ - delta_BKGQ[:, :, None]), 0.0) * spec.scale
        dsT_c = dsT_BKCGQ.astype(q_BKGQH.dtype)
        dk_BKCH = jnp.einsum("bkcgq,bkgqh->bkch", dsT_c, q_BKGQH, preferred_element_type=jnp.float32)
        dqT_BKHGQ = jnp.einsum("bkhc,bkcgq->bkhgq", kT_BKHC, dsT_c, preferred_element_type=jnp.float32)

        def accumulate(total, part, start, axis):
            old = jax.lax.dynamic_slice_in_dim(total, start, part.shape[axis], axis=axis)
            return jax.lax.dynamic_update_slice_in_dim(total, old + part, start, axis=axis)

        return (accumulate(dqT_BKHGT, dqT_BKHGQ, q0, 4), accumulate(dk_BKSH, dk_BKCH, k0, 2),
                accumulate(dv_BKSH, dv_BKCH, k0, 2)), None

    init = (jnp.zeros((B, K, H, G, T_pad), jnp.float32), jnp.zeros((B, K, S_pad, H), jnp.float32),
            jnp.zeros((B, K, S_pad, H), jnp.float32))
    # Key-block major: consecutive steps update the same dk/dv block (FA-2's backward loop order).
    q_blocks_P, k_blocks_P = visible_block_pairs(spec)
    order = np.lexsort((q_blocks_P, k_blocks_P))
    (dqT_BKHGT, dk_BKSH, dv_BKSH), _ = jax.lax.scan(step, init, (q_blocks_P[order], k_blocks_P[order]))
    dq_BTNH = dqT_BKHGT.transpose(0, 4, 1, 3, 2).reshape(B, T_pad, N, H)[:, :T].astype(q_BTNH.dtype)
    dk_BSKH = dk_BKSH.transpose(0, 2, 1, 3)[:, : spec.kv_len].astype(k_BSKH.dtype)
    dv_BSKH = dv_BKSH.transpose(0, 2, 1, 3)[:, : spec.kv_len].astype(v_BSKH.dtype)
    return dq_BTNH, dk_BSKH, dv_BSKH, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _default_block_q(T: int) -> int:
    """Query rows per tile. On XLA:CPU (B*T = 4,096, N=6, H=64, forward and backward of one layer) a
    tile's batched matmuls run faster the more rows they have (~70 GFLOP/s with 128 rows, ~110-150 with
    256 on an AMD EPYC), which outweighs the extra masked share of the diagonal tiles once T is long:
    256 beat 128 by 10% at T=512 and 30% at 2,048 there. From T = 1,024 on, 512 x 256 tiles beat
    256 x 128 on an AVX-512 Xeon with XLA's YNNPACK matmuls by 20-30% (T=1,024: 240-260 against
    312-327 ms; 2,048: 310-439 against 443-579; experiments/bench/README.md, eighth round). At T=256
    a single 256-row block computes a third more of the causal square and is no faster."""
    return 512 if T >= 1024 else 256 if T >= 512 else 128


def _default_block_k(S: int) -> int:
    """Key columns per tile: 256 from S = 1,024 on (with 512 query rows, above), 128 below."""
    return 256 if S >= 1024 else 128


def blockwise_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, *, segment_ids_BT: jax.Array | None = None,
                        causal: bool = True, scale: float | None = None, local_window: int | None = None,
                        block_q: int | None = None, block_k: int | None = None, cpu_kernel: bool = True,
                        rope: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """softmax(scale * q k^T + mask) v, [B, T, N, H] in q's dtype; memory O(T), not O(T^2).

    Query i sees key j when (not causal or j <= i), (local_window is None or i - j < local_window) and,
    with `segment_ids_BT` (self-attention: T == S), both have the same segment id. `scale` None is
    1/sqrt(H). K must divide N (query head n reads KV head n // (N / K)). Matches
    `jax.nn.dot_product_attention(..., is_causal=causal, local_window_size=(local_window - 1, 0))` with
    the segment mask; a query with no visible key gets a finite (meaningless) output, where jax's
    gives the mean of the values. Blocks larger than the sequence are shrunk to it; None picks them by
    length (`_default_block_q`, `_default_block_k`).

    `rope`: RoPE tables (cos, sin) [B, T, H/2] (`rotary.rope_tables`; self-attention) by which q and k
    are rotated first (`rotary.rotate`). With `cpu_kernel` (the default), float32 attention compiled for
    the CPU runs in the native FlashAttention-2 kernel of `cpu_kernels` (same masks, results and
    residuals; its own tile sizes; the rotation inside its tiles) wherever that applies; otherwise, and
    with `cpu_kernel=False`, in the XLA ops below.
    """
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    if k_BSKH.shape != v_BSKH.shape or k_BSKH.shape[0] != B or k_BSKH.shape[3] != H or N % K:
        raise ValueError(f"blockwise_attention: q {q_BTNH.shape}, k {k_BSKH.shape}, v {v_BSKH.shape}: need "
                         f"k and v [B, S, K, H] with K dividing N")
    if segment_ids_BT is not None and (S != T or segment_ids_BT.shape != (B, T)):
        raise ValueError(f"blockwise_attention: segment_ids {segment_ids_BT.shape} need self-attention (S == T) and shape [B, T]")
    if rope is not None and (S != T or rope[0].shape != (B, T, H // 2) or rope[1].shape != rope[0].shape or H % 2):
        raise ValueError(f"blockwise_attention: rope tables {rope[0].shape} and {rope[1].shape} need self-attention "
                         f"(S == T), an even head_dim and shape [B, T, H/2] = {(B, T, H // 2)}")
    if local_window is not None and (not causal or local_window < 1):
        raise ValueError(f"blockwise_attention: local_window needs causal=True and a window >= 1, got {local_window}")
    scale = 1.0 / math.sqrt(H) if scale is None else float(scale)
    if cpu_kernel and (out_BTNH := cpu_kernels.attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, causal=causal, scale=scale,
                                                          local_window=local_window, rope=rope)) is not None:
        return out_BTNH
    if rope is not None:
        q_BTNH, k_BSKH = rotate(q_BTNH, *rope), rotate(k_BSKH, *rope)
    spec = _Spec(causal=causal, scale=scale, local_window=local_window,
                 block_q=min(block_q or _default_block_q(T), T), block_k=min(block_k or _default_block_k(S), S), q_len=T, kv_len=S)
    return _attention(spec, q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
