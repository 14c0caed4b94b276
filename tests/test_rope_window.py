"""RoPE scaling (`model.rope_scaling`) and sliding-window attention (`model.sliding_window`) against
Hugging Face `transformers`: the inverse frequencies of its ROPE_INIT_FUNCTIONS, the logits of a
MistralForCausalLM (sliding window) and of a LlamaForCausalLM with Llama 3.1's RoPE scaling given
the same random weights, KV-cache decoding against the full forward pass, and the config checks.

The weight mapping is written out here, from transformers' parameter names, independently of lmjax.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from lmjax.config import ConfigError, RopeScalingConfig, load_config
from lmjax.models import build_model, init_cache
from lmjax.models.rotary import rope_inverse_frequencies

V, D, LAYERS, HEADS, KV_HEADS, FF = 64, 32, 2, 4, 2, 48


def hf_inverse_frequencies(kind: str, head_dim: int, theta: float, **scaling) -> np.ndarray:
    """transformers' own inverse frequencies (and a check that it leaves attention unscaled)."""
    parameters = {"rope_type": kind, "rope_theta": theta, **scaling}
    original = scaling.get("original_max_position_embeddings", 2048)
    config = transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                                      max_position_embeddings=2 * original, rope_parameters=parameters)
    rope_init = LlamaRotaryEmbedding.compute_default_rope_parameters if kind == "default" else ROPE_INIT_FUNCTIONS[kind]
    inv_freq, attention_factor = rope_init(config)
    assert attention_factor == 1.0
    return inv_freq.numpy()


def unscaled(head_dim: int, theta: float) -> np.ndarray:
    return theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


LLAMA3_CASES = [  # head_dim, theta, factor, low, high, original
    (64, 500000.0, 8.0, 1.0, 4.0, 64),
    (128, 500000.0, 8.0, 1.0, 4.0, 8192),  # Llama 3.1
    (128, 500000.0, 32.0, 1.0, 4.0, 8192),  # Llama 3.2
    (64, 10000.0, 2.0, 0.5, 3.0, 64),
]


@pytest.mark.parametrize("head_dim,theta,factor,low,high,original", LLAMA3_CASES)
def test_llama3_frequencies_equal_transformers(head_dim, theta, factor, low, high, original):
    scaling = dict(factor=factor, low_freq_factor=low, high_freq_factor=high, original_max_position_embeddings=original)
    want = hf_inverse_frequencies("llama3", head_dim, theta, **scaling)
    got = np.asarray(rope_inverse_frequencies(head_dim, theta, RopeScalingConfig(kind="llama3", **scaling)))
    assert got.dtype == np.float32 and got.shape == (head_dim // 2,)
    np.testing.assert_allclose(got, want, rtol=1.5e-7, atol=0)
    # The three bands all occur: kept (short wavelengths), divided by factor (long), in between.
    ratio = unscaled(head_dim, theta) / want
    kept, slowed = np.isclose(ratio, 1.0, rtol=1e-5), np.isclose(ratio, factor, rtol=1e-5)
    assert kept.any() and slowed.any() and (~kept & ~slowed).any()


@pytest.mark.parametrize("head_dim,theta,factor", [(64, 10000.0, 4.0), (128, 500000.0, 8.0), (96, 1e6, 3.0)])
def test_linear_frequencies_equal_transformers(head_dim, theta, factor):
    want = hf_inverse_frequencies("linear", head_dim, theta, factor=factor)
    got = np.asarray(rope_inverse_frequencies(head_dim, theta, RopeScalingConfig(kind="linear", factor=factor)))
    np.testing.assert_allclose(got, want, rtol=1.5e-7, atol=0)
    np.testing.assert_allclose(got, unscaled(head_dim, theta) / factor, rtol=5e-7)


@pytest.mark.parametrize("head_dim,theta", [(64, 10000.0), (128, 500000.0), (8, 100.0)])
def test_unscaled_frequencies_equal_transformers(head_dim, theta):
    """Unscaled RoPE keeps lmjax's original expression (existing runs resume bit for bit), within a
    few float32 last places of transformers' (relative 1.2e-7 each)."""
    want = hf_inverse_frequencies("default", head_dim, theta)
    np.testing.assert_allclose(np.asarray(rope_inverse_frequencies(head_dim, theta, RopeScalingConfig())), want, rtol=5e-7, atol=0)


# ----------------------------------------------------------------------------- whole models


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights far from their init: matrices N(0, 0.2), every norm weight 1 + N(0, 0.1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.2 * noise)
    return model.eval()


def lmjax_params(hf: torch.nn.Module, head_dim: int) -> dict:
    w = {name: p.detach().numpy().astype(np.float32) for name, p in hf.state_dict().items()}

    def heads(name, n):  # torch Linear [n * H, D] -> [D, n, H]
        return w[name].T.reshape(D, n, head_dim)

    params = {"embed": {"embedding": w["model.embed_tokens.weight"]}, "final_norm": {"scale": w["model.norm.weight"]},
              "unembed": w["lm_head.weight"].T}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        params[f"layer_{i}"] = {
            "attention": {"query": {"kernel": heads(p + "self_attn.q_proj.weight", HEADS)},
                          "key": {"kernel": heads(p + "self_attn.k_proj.weight", KV_HEADS)},
                          "value": {"kernel": heads(p + "self_attn.v_proj.weight", KV_HEADS)},
                          "out": {"kernel": w[p + "self_attn.o_proj.weight"].T.reshape(HEADS, head_dim, D)}},
            "attention_norm": {"scale": w[p + "input_layernorm.weight"]},
            "mlp_norm": {"scale": w[p + "post_attention_layernorm.weight"]},
            "mlp": {name: {"kernel": w[f"{p}mlp.{name}_proj.weight"].T} for name in ("gate", "up", "down")},
        }
    return params


def lmjax_model(*overrides: str):
    base = [f"model.vocab_size={V}", f"model.d_model={D}", f"model.n_layers={LAYERS}", f"model.n_heads={HEADS}",
            f"model.n_kv_heads={KV_HEADS}", f"model.d_ff={FF}", "model.norm_eps=1e-5", "model.tie_embeddings=false",
            "model.scan_layers=false"]
    return build_model(load_config(None, [*base, *overrides]).model)


def check_tree_shapes(model, params) -> None:
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
    want = jax.tree.map(lambda s: s.shape, nn.unbox(shapes))
    assert jax.tree.map(np.shape, params) == want


def random_ids(length: int, batch: int = 2, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, (batch, length))


def hf_logits(hf, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.from_numpy(ids)).logits.numpy()


def test_sliding_window_logits_equal_mistral():
    config = transformers.MistralConfig(
        vocab_size=V, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        intermediate_size=FF, sliding_window=4, rms_norm_eps=1e-5, max_position_embeddings=64, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, attn_implementation="eager",
    )
    hf = randomize(transformers.MistralForCausalLM(config).float())
    model = lmjax_model("model.sliding_window=4", "model.rope_theta=10000")
    params = lmjax_params(hf, D // HEADS)
    check_tree_shapes(model, params)
    ids = random_ids(16)
    want = hf_logits(hf, ids)
    got = np.asarray(model.apply({"params": params}, jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # The window matters here: without it the later positions are far off.
    no_window = np.asarray(lmjax_model("model.rope_theta=10000").apply({"params": params}, jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(no_window[:, :4], want[:, :4], atol=1e-4, rtol=0)
    assert np.abs(no_window[:, 4:] - want[:, 4:]).max() > 1e-1


def test_llama3_rope_scaling_logits_equal_llama():
    head_dim, original = 16, 32  # wavelengths 2 pi (kept), ~20 (smoothed), >= 63 (slowed) against 32 / 4 and 32 / 1
    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=original)
    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        head_dim=head_dim, intermediate_size=FF, rms_norm_eps=1e-5, max_position_embeddings=128, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, **scaling}, attn_implementation="eager",
    )
    hf = randomize(transformers.LlamaForCausalLM(config).float())
    overrides = [f"model.head_dim={head_dim}", "model.rope_theta=10000"]
    model = lmjax_model(*overrides, *(f"model.rope_scaling.{k}={v}" for k, v in {"kind": "llama3", **scaling}.items()))
    params = lmjax_params(hf, head_dim)
    check_tree_shapes(model, params)
    ids = random_ids(48)
    want = hf_logits(hf, ids)
    got = np.asarray(model.apply({"params": params}, jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    unscaled_logits = np.asarray(lmjax_model(*overrides).apply({"params": params}, jnp.asarray(ids, jnp.int32)))
    assert np.abs(unscaled_logits[:, 1:] - want[:, 1:]).max() > 1e-2, "the scaling should change every later position"


# ----------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("scan_layers", [True, False])
def test_cached_decoding_with_window_matches_full_forward(scan_layers):
    model = build_model(load_config(None, [
        f"model.vocab_size={V}", f"model.d_model={D}", "model.n_layers=2", f"model.n_heads={HEADS}", f"model.n_kv_heads={KV_HEADS}",
        "model.d_ff=64", "model.init_std=0.3", "model.sliding_window=4", f"model.scan_layers={str(scan_layers).lower()}",
    ]).model)
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    tokens = jnp.asarray(random_ids(16), jnp.int32)
    full = np.asarray(model.apply({"params": params}, tokens))
    # One compiled call per chunk shape (the prefill, then every single-token step).
    decode = jax.jit(lambda variables, *inputs: model.apply(variables, *inputs, decode=True, mutable=["cache"]))
    logits, variables = decode({"params": params, "cache": init_cache(model, batch_size=2, max_length=20)}, tokens[:, :6])
    chunks = [logits]
    for t in range(6, 16):
        logits, variables = decode({"params": params, **variables}, tokens[:, t : t + 1])
        chunks.append(logits)
    # Logits of magnitude ~2 (init_std 0.3) summed in another order by the chunked shapes' matmuls:
    # up to 1.3e-5 apart on an Intel Xeon, under 1e-5 on AMD EPYC. A wrong window or position is
    # off by whole units (a window one token wider: up to 7.3 here).
    atol = 5e-5
    np.testing.assert_allclose(np.concatenate(chunks, axis=1), full, atol=atol, rtol=0)

    # Left padding (segment 0) takes cache slots but must not shift the window of the real tokens.
    pad = 3
    padded = jnp.concatenate([jnp.zeros((2, pad), jnp.int32), tokens], axis=1)
    columns = jnp.broadcast_to(jnp.arange(16 + pad), padded.shape)
    positions, segment_ids = jnp.maximum(columns - pad, 0), (columns >= pad).astype(jnp.int32)
    cache = init_cache(model, batch_size=2, max_length=24)
    logits, variables = decode({"params": params, "cache": cache}, padded[:, :8], positions[:, :8], segment_ids[:, :8])
    chunks = [logits]
    for t in range(8, 16 + pad):
        step = slice(t, t + 1)
        logits, variables = decode({"params": params, **variables}, padded[:, step], positions[:, step], segment_ids[:, step])
        chunks.append(logits)
    np.testing.assert_allclose(np.concatenate(chunks, axis=1)[:, pad:], full, atol=atol, rtol=0)


# ----------------------------------------------------------------------------- config checks


@pytest.mark.parametrize("overrides,message", [
    (["model.family=encoder", "model.style=bert", "train.objective=mlm", "model.sliding_window=4"], "model.sliding_window"),
    (["model.family=t5", "model.style=t5", "train.objective=span_corruption", "data.tokenizer.sentinels=10",
      "model.sliding_window=4"], "model.sliding_window"),
    (["model.sliding_window=0"], "model.sliding_window"),
    (["model.style=gpt2", "model.rope_scaling.kind=llama3"], "model.rope_scaling.kind"),
    (["model.rope_scaling.kind=linear", "model.rope_scaling.factor=0.5"], "model.rope_scaling.factor"),
    (["model.rope_scaling.kind=llama3", "model.rope_scaling.factor=0.9"], "model.rope_scaling.factor"),
    (["model.rope_scaling.kind=llama3", "model.rope_scaling.low_freq_factor=4"], "low_freq_factor"),
    (["model.rope_scaling.kind=llama3", "model.rope_scaling.low_freq_factor=0"], "low_freq_factor"),
    (["model.rope_scaling.kind=llama3", "model.rope_scaling.original_max_position_embeddings=0"],
     "model.rope_scaling.original_max_position_embeddings"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_config(None, overrides)
    assert "\n" not in str(error.value)


def test_valid_settings_load():
    cfg = load_config(None, ["model.sliding_window=1", "model.rope_scaling.kind=llama3", "model.rope_scaling.factor=8"]).model
    assert cfg.sliding_window == 1 and cfg.rope_scaling == RopeScalingConfig(kind="llama3", factor=8.0)
    load_config(None, ["model.family=moe", "model.sliding_window=4096", "model.rope_scaling.kind=linear", "model.rope_scaling.factor=2"])
    assert load_config(None, ["model.style=gpt2"]).model.rope_scaling.kind == "none"  # the default needs no RoPE


def test_unscaled_config_keeps_plain_rope():
    """kind none (any factor) is theta^(-2i/H), within float32 rounding of the float64 formula."""
    got = np.asarray(rope_inverse_frequencies(64, 10000.0, RopeScalingConfig(factor=8.0)))
    np.testing.assert_allclose(got, unscaled(64, 10000.0), rtol=2e-7)
    assert math.isclose(float(got[0]), 1.0)
