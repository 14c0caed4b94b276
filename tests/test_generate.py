"""KV-cache decoding and sampling: cached logits equal the full forward pass, cached greedy
generation equals greedy decoding by full recomputation, left-padded batches of prompts of
different lengths equal each prompt alone, and top-k / top-p never leave their set."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.config import ModelConfig, MoEConfig, load_config
from lmjax import generate as generate_module
from lmjax.generate import GenerateError, generate, sample_logits
from lmjax.models import build_model, init_cache

VOCAB = 64
# Large init so that logits are far from ties and argmax is stable under float reordering.
CONFIGS = {
    "llama": dict(style="llama"),
    "llama-gqa": dict(style="llama", n_kv_heads=2),
    "gpt2": dict(style="gpt2"),
    "llama-mqa-loop": dict(style="llama", n_kv_heads=1, scan_layers=False),
}


def setup_model(**overrides):
    base = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32, init_std=0.3)
    model = build_model(ModelConfig(**{**base, **overrides}))
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    return model, params


def prompts(batch=2, length=5, seed=1):
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length)).astype(np.int32)


def greedy_by_recomputation(model, params, prompt, max_new_tokens):
    """Greedy decoding without a cache: a full forward pass per new token, over one fixed width (the
    model is causal, so the zero columns right of the last token change nothing: one compile)."""
    forward = jax.jit(lambda tokens: model.apply({"params": params}, tokens))
    tokens = np.asarray(prompt)
    length = tokens.shape[1]
    tokens = np.concatenate([tokens, np.zeros((tokens.shape[0], max_new_tokens), tokens.dtype)], axis=1)
    for t in range(length, length + max_new_tokens):
        tokens[:, t] = np.argmax(np.asarray(forward(tokens))[:, t - 1], axis=-1)
    return tokens


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2"])
def test_prefill_then_single_steps_match_full_forward(name):
    model, params = setup_model(**CONFIGS[name])
    tokens = prompts(length=9)
    full = model.apply({"params": params}, tokens)
    cache = init_cache(model, batch_size=2, max_length=12)
    decode = jax.jit(lambda variables, chunk: model.apply(variables, chunk, decode=True, mutable=["cache"]))  # a compile per width
    logits, variables = decode({"params": params, "cache": cache}, tokens[:, :5])
    chunks = [logits]
    for t in range(5, 9):
        logits, variables = decode({"params": params, **variables}, tokens[:, t : t + 1])
        chunks.append(logits)
    np.testing.assert_allclose(np.concatenate(chunks, axis=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_greedy_equals_greedy_by_recomputation(name):
    model, params = setup_model(**CONFIGS[name])
    prompt = prompts()
    want = greedy_by_recomputation(model, params, prompt, max_new_tokens=7)
    got = generate(model, params, prompt, max_new_tokens=7, rng=jax.random.key(0))
    assert got.shape == (2, 12)
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(want[:, 5:])) > 1, "degenerate continuation: the comparison would be weak"


def test_top_k_one_equals_greedy_and_eos_stops_rows():
    model, params = setup_model(**CONFIGS["llama"])
    prompt = prompts()
    want = greedy_by_recomputation(model, params, prompt, max_new_tokens=6)
    top1 = generate(model, params, prompt, 6, jax.random.key(3), temperature=1.0, top_k=1)
    np.testing.assert_array_equal(top1, want)

    eos = int(want[0, 7])  # the third generated token of row 0
    expected = want.copy()
    for row in expected:
        hits = np.flatnonzero(row[5:] == eos)
        if hits.size:
            row[5 + hits[0] :] = eos
    stopped = generate(model, params, prompt, 6, jax.random.key(0), eos_id=eos)
    np.testing.assert_array_equal(stopped, expected)


def sample_many(probs, n=4000, **kwargs):
    logits = jnp.log(jnp.tile(jnp.asarray(probs, jnp.float32), (n, 1)))
    return np.asarray(sample_logits(logits, jax.random.key(0), **kwargs))


def test_top_p_never_leaves_the_nucleus():
    probs = [0.05, 0.5, 0.15, 0.3]  # nucleus for top_p=0.75: {1, 3}; for 0.9: {1, 3, 2}
    assert set(sample_many(probs, top_p=0.75)) == {1, 3}
    assert set(sample_many(probs, top_p=0.9)) == {1, 2, 3}
    assert set(sample_many(probs, top_p=0.4)) == {1}
    assert set(sample_many(probs)) == {0, 1, 2, 3}, "without top_p every token should appear"


def test_top_k_and_temperature():
    probs = [0.05, 0.5, 0.15, 0.3]
    assert set(sample_many(probs, top_k=2)) == {1, 3}
    assert set(sample_many(probs, temperature=0.0, top_p=0.5)) == {1}
    sharp = np.bincount(sample_many(probs, temperature=0.25), minlength=4) / 4000
    assert sharp[1] > 0.85, f"temperature 0.25 should concentrate on the mode, got {sharp}"


def test_bad_settings_raise():
    model, params = setup_model(style="gpt2", max_seq_len=8)
    with pytest.raises(GenerateError, match="top_p"):
        sample_logits(jnp.zeros((1, 4)), jax.random.key(0), top_p=0.0)
    with pytest.raises(GenerateError, match="max_seq_len"):
        generate(model, params, prompts(length=5), 4, jax.random.key(0))
    with pytest.raises(GenerateError, match="prompt_tokens"):
        generate(model, params, np.zeros((3,), np.int32), 2, jax.random.key(0))


# ----------------------------------------------------------------------------- left-padded batches

LENGTHS = (3, 7, 5)
PADDED_CONFIGS = {**CONFIGS, "moe": dict(family="moe", moe=MoEConfig(n_experts=4, top_k=2, d_ff_expert=16))}


def left_padded(lengths=LENGTHS, seed=2):
    """(the prompts alone, the batch [len(lengths), max(lengths)] left-padded with random ids)."""
    rng = np.random.default_rng(seed)
    alone = [rng.integers(0, VOCAB, (1, n)).astype(np.int32) for n in lengths]
    padded = rng.integers(0, VOCAB, (len(lengths), max(lengths))).astype(np.int32)  # pads hold any id
    for row, prompt in zip(padded, alone):
        row[row.size - prompt.shape[1] :] = prompt[0]
    return alone, padded


@pytest.mark.parametrize("name", ["llama", "gpt2", "llama-mqa-loop", "moe"])
def test_left_padded_batch_generates_what_each_prompt_generates_alone(name):
    model, params = setup_model(**PADDED_CONFIGS[name])
    alone, padded = left_padded()
    got = generate(model, params, padded, 6, jax.random.key(0), prompt_lengths=LENGTHS)
    assert got.shape == (3, 7 + 6)
    np.testing.assert_array_equal(got[:, :7], padded)
    for row, prompt in zip(got, alone):
        want = generate(model, params, prompt, 6, jax.random.key(0))[0]
        np.testing.assert_array_equal(row[7 - prompt.shape[1] :], want)
    assert len(np.unique(got[:, 7:])) > 3, "degenerate continuation: the comparison would be weak"


def test_other_prompt_lengths_reuse_the_compiled_loop():
    model, params = setup_model(**CONFIGS["llama"])
    _, padded = left_padded()
    generate(model, params, padded, 4, jax.random.key(0), prompt_lengths=LENGTHS)
    compiled = generate_module._generate._cache_size()
    generate(model, params, padded, 4, jax.random.key(0), prompt_lengths=[7, 1, 2])
    assert generate_module._generate._cache_size() == compiled


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2"])
def test_padded_row_logits_equal_the_row_alone(name):
    """Prefill and the first decoding step of a left-padded row, against the row alone: pad keys are
    never attended to, and pad queries (which see only themselves) stay finite."""
    model, params = setup_model(**CONFIGS[name])
    alone, padded = left_padded(lengths=(7, 4))
    pad = 7 - alone[1].shape[1]
    columns = np.arange(7)
    positions = np.maximum(columns - np.array([[0], [pad]]), 0)
    segment_ids = (columns >= np.array([[0], [pad]])).astype(np.int32)
    next_tokens = np.array([[5], [9]], np.int32)

    @jax.jit
    def prefill_and_step(tokens, cache, positions=None, segment_ids=None):
        prefill, variables = model.apply(
            {"params": params, "cache": cache}, tokens, positions, segment_ids, decode=True, mutable=["cache"]
        )
        step_positions = None if positions is None else positions[:, -1:] + 1
        step_tokens = next_tokens[-tokens.shape[0] :]
        step, _ = model.apply({"params": params, **variables}, step_tokens, step_positions, decode=True, mutable=["cache"])
        return prefill, step

    prefill, step = map(np.asarray, prefill_and_step(padded, init_cache(model, 2, 8), positions, segment_ids))
    prefill_alone, step_alone = map(np.asarray, prefill_and_step(alone[1], init_cache(model, 1, 5)))
    assert np.isfinite(prefill).all()
    np.testing.assert_allclose(prefill[1, pad:], prefill_alone[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(step[1], step_alone[0], atol=1e-5, rtol=0)
    # The unpadded row 0 is unchanged by its neighbour's padding.
    np.testing.assert_allclose(prefill[0], model.apply({"params": params}, padded[:1])[0], atol=1e-5, rtol=0)


def test_left_padded_encoder_decoder_equals_each_prompt_alone():
    cfg = load_config(None, [
        "model.family=t5", "model.style=t5", f"model.vocab_size={VOCAB}", "model.d_model=32", "model.n_layers=2",
        "model.n_heads=4", "model.d_ff=64", "model.tie_embeddings=false", "train.objective=span_corruption",
        "data.tokenizer.sentinels=10",
    ]).model
    model = build_model(cfg)
    tokens = jnp.zeros((1, 8), jnp.int32)
    params = nn.unbox(model.init(jax.random.key(0), tokens, tokens)["params"])
    alone, padded = left_padded()
    got = generate(model, params, padded, 6, jax.random.key(0), prompt_lengths=LENGTHS)
    assert got.shape == (3, 1 + 6)
    for row, prompt in zip(got, alone):
        np.testing.assert_array_equal(row, generate(model, params, prompt, 6, jax.random.key(0))[0])
    assert len(np.unique(got[:, 1:])) > 3, "degenerate continuation: the comparison would be weak"


@pytest.mark.parametrize(
    "lengths, match",
    [([3, 7], r"shape \(3,\)"), ([[3, 7, 5]], r"shape \(3,\)"), ([3.0, 7.0, 5.0], "integer"), ([0, 7, 5], "got min 0"),
     ([3, 8, 5], "max 8")],
)
def test_bad_prompt_lengths_raise(lengths, match):
    model, params = setup_model(**CONFIGS["llama"])
    _, padded = left_padded()
    with pytest.raises(GenerateError, match=f"prompt_lengths: .*{match}"):
        generate(model, params, padded, 2, jax.random.key(0), prompt_lengths=lengths)
