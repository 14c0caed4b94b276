"""Blockwise (flash) attention against jax.nn.dot_product_attention: values and q/k/v gradients in
float32, over causal / bidirectional, packed segments, GQA, sliding windows, ragged lengths and
several blocks (so tiles are skipped and the online softmax spans blocks); the tile list; and the
`model.attention=blockwise` switch of the decoder. Small shapes: seconds on 2 cores."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.config import ConfigError, ModelConfig, load_config
from lmjax.models import build_model, layers
from lmjax.models.flash_attention import _Spec, blockwise_attention, visible_block_pairs
from lmjax.models.rotary import rope_tables, rotate

B, T, N, H = 2, 37, 4, 8  # T a multiple of no block size below


def segments(kind: str, length: int = T) -> np.ndarray | None:
    """None, or [2, length] ids: row 0 packs three documents (the last one ragged), row 1 is one document."""
    if kind == "none":
        return None
    a, b = length // 4, length // 2
    return np.array([[1] * a + [2] * b + [3] * (length - a - b), [7] * length], np.int32)


def reference(q, k, v, seg, causal, scale, window):
    mask = None if seg is None else jnp.asarray(seg[:, :, None] == seg[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=causal,
                                        local_window_size=None if window is None else (window - 1, 0))


def values_and_grads(fn, q, k, v, w):
    """fn(q, k, v) and the gradients of a random projection of it w.r.t. q, k and v, in one compiled call."""
    def projected(q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out * w), out

    (_, out), grads = jax.jit(jax.value_and_grad(projected, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


CASES = {  # name: (causal, segment kind, kv heads, window, scale, block_q, block_k)
    "causal": (True, "none", N, None, None, 8, 8),
    "bidirectional": (False, "none", N, None, None, 8, 16),
    "causal_packed": (True, "packed", N, None, None, 8, 16),
    "bidirectional_packed_gqa_2": (False, "packed", 2, None, None, 16, 8),
    "causal_packed_gqa_1_scale": (True, "packed", 1, None, 0.3, 16, 16),
    "window": (True, "none", N, 5, None, 8, 8),
    "window_packed_gqa_2": (True, "packed", 2, 11, None, 8, 16),
    "window_wider_than_blocks": (True, "packed", 1, 20, None, 16, 8),
    "one_block": (True, "packed", 2, None, None, 64, 64),  # blocks shrink to T: a single tile
}


def assert_equals_reference(causal, seg_kind, kv_heads, window, scale, length=T, seed=0, cpu_kernel=True, **blocks):
    """blockwise_attention's values and q/k/v gradients equal jax's on random inputs of `length`."""
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (B, length, N, H))
    k, v = (jax.random.normal(key, (B, length, kv_heads, H)) for key in keys[1:3])
    w = jax.random.normal(keys[3], (B, length, N, H))
    seg = segments(seg_kind, length)
    want, want_grads = values_and_grads(lambda q, k, v: reference(q, k, v, seg, causal, scale, window), q, k, v, w)
    got, got_grads = values_and_grads(
        (lambda q, k, v: blockwise_attention(q, k, v, segment_ids_BT=None if seg is None else jnp.asarray(seg), causal=causal,
                                                    scale=scale, local_window=window, cpu_kernel=cpu_kernel, **blocks)), q, k, v, w)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    for name_, g, g_want in zip("qkv", got_grads, want_grads):
        assert g.shape == g_want.shape, name_
        np.testing.assert_allclose(g, g_want, atol=2e-5, rtol=1e-5, err_msg=f"d{name_}")


# Both implementations: float32 on the CPU runs in the native kernel (cpu_kernels; its own tiles, so the
# blocks below apply to the XLA ops only), cpu_kernel=False in XLA ops.
@pytest.mark.parametrize("cpu_kernel", [True, False], ids=["kernel", "xla"])
@pytest.mark.parametrize("name", list(CASES))
def test_values_and_gradients_equal_jax_dot_product_attention(name, cpu_kernel):
    causal, seg_kind, kv_heads, window, scale, block_q, block_k = CASES[name]
    assert_equals_reference(causal, seg_kind, kv_heads, window, scale, cpu_kernel=cpu_kernel, block_q=block_q, block_k=block_k)


@pytest.mark.parametrize("cpu_kernel", [True, False], ids=["kernel", "xla"])
@pytest.mark.parametrize("length", [600, 1100])
def test_default_blocks_at_a_long_ragged_length_equal_jax_dot_product_attention(length, cpu_kernel):
    # The blocks the models use (XLA: 256 x 128 tiles from T = 512 on, 512 x 256 from 1,024; the kernel:
    # cpu_kernels.BLOCK_Q x BLOCK_K), at lengths that are multiples of none (ragged last tiles), with GQA
    # and packed rows.
    assert_equals_reference(True, "packed", 1, None, None, length=length, seed=2, cpu_kernel=cpu_kernel)


@pytest.mark.parametrize("cpu_kernel", [True, False], ids=["kernel", "xla"])
@pytest.mark.parametrize("kv_heads", [N, 1])
def test_rope_tables_equal_rotating_q_and_k_first(cpu_kernel, kv_heads):
    # Packed rows whose positions restart at each document, as the models feed them.
    keys = jax.random.split(jax.random.key(3), 4)
    H2 = 16  # an even head_dim of 8 pairs
    q, w = (jax.random.normal(key, (B, T, N, H2)) for key in (keys[0], keys[3]))
    k, v = (jax.random.normal(key, (B, T, kv_heads, H2)) for key in keys[1:3])
    seg = segments("packed")
    starts = np.maximum.accumulate(np.where(np.diff(seg, prepend=-1, axis=1) != 0, np.arange(T), 0), axis=1)
    cos, sin = rope_tables(jnp.asarray(np.arange(T) - starts), H2, 10000.0)
    want, want_grads = values_and_grads(lambda q, k, v: reference(rotate(q, cos, sin), rotate(k, cos, sin), v, seg, True, None, None),
                                        q, k, v, w)
    got, got_grads = values_and_grads(lambda q, k, v: blockwise_attention(q, k, v, segment_ids_BT=jnp.asarray(seg), block_q=8,
                                                                          block_k=16, cpu_kernel=cpu_kernel, rope=(cos, sin)),
                                      q, k, v, w)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    for name_, g, g_want in zip("qkv", got_grads, want_grads):
        np.testing.assert_allclose(g, g_want, atol=2e-5, rtol=1e-5, err_msg=f"d{name_}")


@pytest.mark.parametrize("causal,window,block_q,block_k", [(True, None, 8, 8), (True, None, 8, 16), (True, 5, 8, 8),
                                                           (True, 20, 16, 8), (False, None, 8, 16)])
def test_visited_tiles_are_exactly_those_with_a_visible_entry(causal, window, block_q, block_k):
    spec = _Spec(causal=causal, scale=1.0, local_window=window, block_q=block_q, block_k=block_k, q_len=T, kv_len=T)
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    visible = np.ones((T, T), bool) if not causal else j <= i
    if window is not None:
        visible &= i - j < window
    n_q, n_k = -(-T // block_q), -(-T // block_k)
    want = {(qi, kj) for qi in range(n_q) for kj in range(n_k)
            if visible[qi * block_q:(qi + 1) * block_q, kj * block_k:(kj + 1) * block_k].any()}
    q_blocks, k_blocks = visible_block_pairs(spec)
    assert set(zip(q_blocks.tolist(), k_blocks.tolist())) == want and len(q_blocks) == len(want)
    if causal:
        assert len(want) < n_q * n_k  # tiles above the diagonal are skipped, not masked


def test_bfloat16_inputs_keep_their_dtype_and_stay_close():
    q, k, v = (jax.random.normal(key, (B, T, N, H)) for key in jax.random.split(jax.random.key(1), 3))
    seg = jnp.asarray(segments("packed"))
    got = blockwise_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), segment_ids_BT=seg, block_q=8, block_k=8)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), reference(q, k, v, np.asarray(seg), True, None, None), atol=5e-2)


def tiny(**overrides) -> ModelConfig:
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64, init_std=0.1)
    return ModelConfig(**{**base, **overrides})


def test_decoder_blockwise_switch_gives_xla_logits(monkeypatch):
    # GQA, packed rows and a window narrower than the longest document: every input of the kernel is wired;
    # small blocks, so the model runs several of them as at real lengths.
    monkeypatch.setattr(layers, "blockwise_attention", functools.partial(blockwise_attention, block_q=8, block_k=16))
    # (Gradients are compared at the kernel level above; a model-level gradient check doubles this test's time.)
    xla, blockwise = build_model(tiny(sliding_window=12)), build_model(tiny(sliding_window=12, attention="blockwise"))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, T)), jnp.int32)
    seg = jnp.asarray(segments("packed"))
    positions = jnp.asarray(np.concatenate([np.arange(T)[None], np.arange(T)[None]]))  # any positions do here
    # Random parameters of init's shapes; `init` itself would compile an RNG per parameter (seconds on CPU).
    shapes = nn.unbox(jax.eval_shape(xla.init, jax.random.key(0), tokens[:, :8])["params"])
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype), shapes)
    want, got = (jax.jit(model.apply)({"params": params}, tokens, positions, seg) for model in (xla, blockwise))
    # The switch really routes to the kernel (its custom_vjp), so equal logits are not a fallback's.
    traced = {model: str(jax.make_jaxpr(model.apply)({"params": params}, tokens, positions, seg)) for model in (xla, blockwise)}
    assert traced[blockwise].count("custom_vjp_call") > traced[xla].count("custom_vjp_call")  # (SwiGLU has one too)
    assert f"{T},{T}]" in traced[xla] and f"{T},{T}]" not in traced[blockwise]  # nor any [T, T] scores or mask
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_blockwise_is_refused_for_t5():
    with pytest.raises(ConfigError, match="model.attention=blockwise"):
        load_config(None, ["model.family=t5", "model.style=t5", "model.attention=blockwise", "train.objective=span_corruption",
                           "data.tokenizer.sentinels=10"])
