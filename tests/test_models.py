"""Dense decoder: causality, packing, attention against a numpy reference, scan/remat equivalence,
parameter counts and logical axis names. Tiny models; every check compares with an independent
computation."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.config import ConfigError, ModelConfig
from lmjax.models import ModelInputError, build_model
from lmjax.models.layers import Attention, swiglu
from lmjax.models.rotary import apply_rope

VOCAB = 64


def tiny(**overrides) -> ModelConfig:
    base = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32, init_std=0.1)
    return ModelConfig(**{**base, **overrides})


def init_params(cfg: ModelConfig, length: int = 8, seed: int = 0):
    model = build_model(cfg)
    variables = model.init(jax.random.key(seed), jnp.zeros((1, length), jnp.int32))
    return model, nn.unbox(variables["params"])


def random_tokens(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, shape), jnp.int32)


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_changing_a_token_changes_only_later_logits(style):
    model, params = init_params(tiny(style=style))
    tokens = random_tokens((2, 12))
    t = 5
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % VOCAB)
    before = model.apply({"params": params}, tokens)
    after = model.apply({"params": params}, changed)
    np.testing.assert_array_equal(before[:, :t], after[:, :t])
    assert np.all(np.abs(before[:, t:] - after[:, t:]).max(axis=-1) > 1e-4), "every later position should move"


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_packed_document_matches_document_alone(style):
    model, params = init_params(tiny(style=style))
    doc_a, doc_b = random_tokens((6,), seed=2), random_tokens((4,), seed=3)
    alone = model.apply({"params": params}, doc_a[None])  # default positions and segment ids

    # Row 0: A then padding. Row 1: B then A, positions restarting. Row 2: all padding.
    tokens = jnp.stack([jnp.concatenate([doc_a, jnp.zeros(4, jnp.int32)]), jnp.concatenate([doc_b, doc_a]), jnp.zeros(10, jnp.int32)])
    segment_ids = jnp.array([[1] * 6 + [0] * 4, [1] * 4 + [2] * 6, [0] * 10])
    positions = jnp.array([list(range(6)) + list(range(4)), list(range(4)) + list(range(6)), list(range(10))])
    packed = model.apply({"params": params}, tokens, positions, segment_ids)

    np.testing.assert_allclose(packed[0, :6], alone[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(packed[1, 4:], alone[0], atol=1e-5, rtol=0)
    assert np.isfinite(np.asarray(packed)).all(), "padding must not produce NaN"
    # Without segment ids, A in row 1 sees B: the mask is what makes the two agree.
    unmasked = model.apply({"params": params}, tokens, positions)
    assert np.abs(unmasked[1, 4:] - alone[0]).max() > 1e-4


def rope_reference(x_BTNH, positions_BT, theta):
    """Rotates the pair (i, i + H/2) by angle position * theta^(-2i/H), one pair at a time."""
    x = np.asarray(x_BTNH, np.float64)
    out = x.copy()
    half = x.shape[-1] // 2
    for i in range(half):
        angle = np.asarray(positions_BT, np.float64)[:, :, None] * theta ** (-2.0 * i / x.shape[-1])
        a, b = x[..., i], x[..., i + half]
        out[..., i] = a * np.cos(angle) - b * np.sin(angle)
        out[..., i + half] = a * np.sin(angle) + b * np.cos(angle)
    return out


def attention_reference(p, x, positions, segment_ids, n_heads, theta):
    """Plain multi-head attention in numpy; GQA weights are expanded to one K/V head per query head."""
    x = np.asarray(x, np.float64)
    wq, wk, wv, wo = (np.asarray(p[name]["kernel"], np.float64) for name in ("query", "key", "value", "out"))
    group = n_heads // wk.shape[1]
    wk, wv = np.repeat(wk, group, axis=1), np.repeat(wv, group, axis=1)
    q = rope_reference(np.einsum("btd,dnh->btnh", x, wq), positions, theta)
    k = rope_reference(np.einsum("btd,dnh->btnh", x, wk), positions, theta)
    v = np.einsum("btd,dnh->btnh", x, wv)
    scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    t = np.arange(x.shape[1])
    allowed = (t[None, :, None] >= t[None, None, :]) & (segment_ids[:, :, None] == segment_ids[:, None, :])
    scores = np.where(allowed[:, None], scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh,nhd->btd", weights, v, wo)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_attention_matches_numpy_multi_head_reference(n_kv_heads):
    cfg = tiny(n_kv_heads=n_kv_heads, rope_theta=100.0)
    x = jax.random.normal(jax.random.key(0), (2, 7, cfg.d_model))
    segment_ids = np.array([[1, 1, 1, 2, 2, 2, 2], [1] * 7])
    positions = np.array([[0, 1, 2, 0, 1, 2, 3], list(range(7))])
    attention = Attention(cfg)
    params = nn.unbox(attention.init(jax.random.key(1), x, positions, segment_ids)["params"])
    got = attention.apply({"params": params}, x, positions, segment_ids)
    want = attention_reference(params, x, positions, segment_ids, cfg.n_heads, cfg.rope_theta)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 1, 16))
    def score(q_pos, k_pos):
        rq = apply_rope(q, jnp.full((1, 1), q_pos), 10000.0)
        rk = apply_rope(k, jnp.full((1, 1), k_pos), 10000.0)
        return float(jnp.sum(rq * rk))
    assert score(7, 3) == pytest.approx(score(104, 100), abs=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-3)


def test_scanned_and_looped_layers_agree():
    cfg = tiny(n_kv_heads=2)
    scanned, params = init_params(cfg)
    looped = build_model(tiny(n_kv_heads=2, scan_layers=False))
    looped_params = {k: v for k, v in params.items() if k != "layers"}
    for i in range(cfg.n_layers):
        looped_params[f"layer_{i}"] = jax.tree.map(lambda a: a[i], params["layers"])
    tokens = random_tokens((2, 8))
    np.testing.assert_allclose(
        scanned.apply({"params": params}, tokens), looped.apply({"params": looped_params}, tokens), atol=1e-5, rtol=0
    )


def loss_and_grads(model, params, tokens):
    def loss_fn(p):
        logits = model.apply({"params": p}, tokens[:, :-1])
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))
    return jax.jit(jax.value_and_grad(loss_fn))(params)


@pytest.mark.parametrize("remat,scan,attention", [("full", True, "xla"), ("dots", True, "xla"), ("full", False, "xla"),
                                                   ("dots", True, "blockwise"), ("dots", False, "blockwise"),
                                                   ("full", True, "blockwise_xla")])
def test_remat_keeps_loss_and_gradients(remat, scan, attention):
    base, params = init_params(tiny(scan_layers=scan, attention=attention))
    rematted = build_model(tiny(scan_layers=scan, remat=remat, attention=attention))
    tokens = random_tokens((2, 9))
    loss, grads = loss_and_grads(base, params, tokens)
    loss_r, grads_r = loss_and_grads(rematted, params, tokens)
    assert float(loss_r) == pytest.approx(float(loss), abs=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), grads, grads_r)


def planned_gradient_memory(cfg: ModelConfig) -> float:
    """XLA's temporary buffers for the gradient of a decoder's loss, in MiB."""
    model, params = init_params(cfg)
    tokens = random_tokens((8, 128))
    loss = lambda p: jnp.sum(model.apply({"params": p}, tokens))  # noqa: E731
    return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes / 2**20


@pytest.mark.parametrize("remat,attention", [("dots", "blockwise"), ("dots", "xla"), ("full", "xla")])
def test_unrolled_layers_plan_no_more_memory_than_scanned(remat, attention):
    # stacking.run_layer: without it XLA hoists every unrolled layer's recomputation into the forward
    # pass and keeps its results alive (here 1.3x to 3x the scanned model's temporaries).
    shape = dict(d_model=64, n_layers=4, d_ff=256, max_seq_len=128, remat=remat, attention=attention)
    scanned = planned_gradient_memory(tiny(**shape))
    unrolled = planned_gradient_memory(tiny(scan_layers=False, **shape))
    assert unrolled <= 1.05 * scanned, (unrolled, scanned)


def gradient_program(attention: str, remat: str) -> str:
    """The lowered gradient program of a tiny decoder."""
    model, params = init_params(tiny(attention=attention, remat=remat))
    tokens = random_tokens((2, 9))
    loss = lambda p: jnp.sum(model.apply({"params": p}, tokens))  # noqa: E731
    return jax.jit(jax.grad(loss)).lower(params).as_text()


def attention_tile_matmuls(remat: str) -> int:
    """Matmuls between 5-d tiles ([B, K, G, Q, H] x [B, K, C, H], blockwise attention's XLA ops) in the
    lowered gradient program of a tiny blockwise decoder."""
    text = gradient_program("blockwise_xla", remat)
    return sum(1 for line in text.splitlines() if "stablehlo.dot_general" in line and re.search(r"tensor<\d+x\d+x\d+x\d+x\d+xf32>", line))


def test_remat_dots_keeps_blockwise_attentions_output_instead_of_rerunning_it():
    # Forward: scores and probabilities x values (2); backward: scores again, dV, dP, dQ, dK (5).
    # Without the saved output and logsumexp, remat reruns the forward's two in the backward.
    assert attention_tile_matmuls("none") == 7
    assert attention_tile_matmuls("dots") == 7
    assert attention_tile_matmuls("full") == 9


def test_remat_dots_keeps_the_cpu_kernels_output_instead_of_rerunning_it():
    # The native kernel's residuals carry the same checkpoint names: one forward call per layer call
    # (the layers are scanned: one in the program) unless remat=full reruns it in the backward.
    forward_calls = lambda remat: gradient_program("blockwise", remat).count("custom_call @lmjax_attention_cpu_forward(")  # noqa: E731
    assert forward_calls("none") == 1
    assert forward_calls("dots") == 1
    assert forward_calls("full") == 2


@pytest.mark.parametrize("tie", [True, False])
def test_gpt2_parameter_count(tie):
    cfg = tiny(style="gpt2", tie_embeddings=tie, n_kv_heads=2)
    model, params = init_params(cfg)
    d, f, v, h, k, hd, n = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.n_heads, cfg.kv_heads, cfg.head_size, cfg.n_layers
    attention = (d * h * hd + h * hd) + 2 * (d * k * hd + k * hd) + (h * hd * d + d)
    mlp = (d * f + f) + (f * d + d)
    per_layer = attention + mlp + 2 * 2 * d  # two LayerNorms with scale and bias
    expected = v * d + cfg.max_seq_len * d + n * per_layer + 2 * d + (0 if tie else d * v)
    assert sum(x.size for x in jax.tree.leaves(params)) == expected
    logits = model.apply({"params": params}, random_tokens((2, 8)))
    assert logits.shape == (2, 8, VOCAB) and logits.dtype == jnp.float32


@pytest.mark.parametrize("cfg", [tiny(tie_embeddings=False, n_kv_heads=2), tiny(style="gpt2", scan_layers=False)], ids=["llama-scan", "gpt2-loop"])
def test_every_parameter_has_logical_axis_names(cfg):
    model = build_model(cfg)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    specs = nn.get_partition_spec(variables)["params"]
    ndims = {jax.tree_util.keystr(path): a.ndim for path, a in jax.tree_util.tree_leaves_with_path(nn.unbox(variables["params"]))}
    is_spec = lambda s: isinstance(s, jax.sharding.PartitionSpec)  # noqa: E731
    named = {jax.tree_util.keystr(path): spec for path, spec in jax.tree_util.tree_leaves_with_path(specs, is_leaf=is_spec)}
    assert named.keys() == ndims.keys()
    for name, spec in named.items():
        assert is_spec(spec) and len(spec) == ndims[name], f"{name}: {spec} for a {ndims[name]}-d parameter"
        assert None not in spec or "position_embedding" in name, f"{name}: unnamed axis in {spec}"
        if cfg.scan_layers and name.startswith("['layers']"):
            assert spec[0] == "layers", name
    block = specs["layers"] if cfg.scan_layers else specs["layer_0"]
    prefix = ("layers",) if cfg.scan_layers else ()
    assert tuple(block["attention"]["query"]["kernel"]) == (*prefix, "embed", "heads", "head_dim")
    assert tuple(block["attention"]["key"]["kernel"]) == (*prefix, "embed", "kv_heads", "head_dim")
    assert tuple(block["attention"]["out"]["kernel"]) == (*prefix, "heads", "head_dim", "embed")
    assert tuple(specs["embed"]["embedding"]) == ("vocab", "embed")


def test_bfloat16_compute_with_float32_params():
    model, params = init_params(tiny(dtype="bfloat16"))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    reference = build_model(tiny()).apply({"params": params}, random_tokens((2, 8)))
    logits = model.apply({"params": params}, random_tokens((2, 8)))
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, reference, atol=0.1)
    _, bf16_params = init_params(tiny(param_dtype="bfloat16"))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf16_params))


def test_bad_inputs_raise_clear_errors():
    model, params = init_params(tiny(style="gpt2", max_seq_len=8))
    with pytest.raises(ModelInputError, match="integer array"):
        model.apply({"params": params}, jnp.zeros((8,), jnp.int32))
    with pytest.raises(ModelInputError, match="max_seq_len"):
        model.apply({"params": params}, jnp.zeros((1, 9), jnp.int32))
    with pytest.raises(ModelInputError, match="segment_ids"):
        model.apply({"params": params}, jnp.zeros((1, 4), jnp.int32), segment_ids=jnp.ones((1, 5), jnp.int32))
    with pytest.raises(ConfigError, match="model.family"):
        build_model(tiny(family="no_such_family"))
    with pytest.raises(ConfigError, match="cudnn"):
        build_model(tiny(attention="cudnn")).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


def test_swiglu_gradient_matches_autodiff_of_silu():
    # The hand-written backward of `swiglu` against JAX differentiating silu(g) * u itself.
    rng = np.random.default_rng(0)
    gate, up, d_out = (jnp.asarray(rng.normal(size=(3, 5, 7)) * 3, jnp.float32) for _ in range(3))
    reference = jax.vjp(lambda g, u: jax.nn.silu(g) * u, gate, up)
    ours = jax.vjp(swiglu, gate, up)
    np.testing.assert_allclose(ours[0], reference[0], rtol=1e-6)
    for got, want in zip(ours[1](d_out), reference[1](d_out)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("style", ["llama", "gpt2"])
@pytest.mark.parametrize("feed_forward", ["swiglu", "gated_gelu", "gelu", "relu"])
def test_feed_forward_kinds_have_their_hand_counted_parameters(style, feed_forward):
    from lmjax import flops

    cfg = tiny(style=style, feed_forward=feed_forward)
    _, params = init_params(cfg)
    mlp = params["layers"]["mlp"]
    d, f, n = cfg.d_model, cfg.d_ff, cfg.n_layers
    hidden = 2 if feed_forward in ("swiglu", "gated_gelu") else 1
    expected = n * (hidden * d * f + f * d + ((hidden * f + d) if style == "gpt2" else 0))  # weights, then biases
    assert sum(x.size for x in jax.tree.leaves(mlp)) == expected
    assert sum(x.size for x in jax.tree.leaves(params)) == flops.param_counts(cfg)["total"]
