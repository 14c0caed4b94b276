"""lmjax's T5 against Hugging Face `transformers`' T5ForConditionalGeneration: the same random
weights give the same logits (T5 v1.1 and the original T5), and the same greedy generation.

The weight mapping is written out here, from transformers' parameter names, independently of lmjax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from lmjax.config import load_config
from lmjax.generate import generate
from lmjax.models import build_model

D, HEADS, HEAD_DIM, FF, V, ENCODER_LAYERS, DECODER_LAYERS = 32, 4, 8, 64, 96, 2, 3


def hf_model(v1_1: bool):
    config = transformers.T5Config(
        vocab_size=V, d_model=D, d_kv=HEAD_DIM, d_ff=FF, num_layers=ENCODER_LAYERS, num_decoder_layers=DECODER_LAYERS,
        num_heads=HEADS, relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0,
        layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu" if v1_1 else "relu", tie_word_embeddings=not v1_1,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    with torch.no_grad():  # random relative biases: initialised they are too small to test the buckets
        for stack in (model.encoder, model.decoder):
            stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight.normal_()
    return model


def lmjax_params(hf, v1_1: bool) -> dict:
    w = {name: p.detach().numpy().astype(np.float32) for name, p in hf.state_dict().items()}

    def heads(name):  # torch Linear [N * H, D] -> [D, N, H]
        return w[name].T.reshape(D, HEADS, HEAD_DIM)

    def attention(prefix):
        return {
            "query": {"kernel": heads(f"{prefix}.q.weight")}, "key": {"kernel": heads(f"{prefix}.k.weight")},
            "value": {"kernel": heads(f"{prefix}.v.weight")}, "out": {"kernel": w[f"{prefix}.o.weight"].T.reshape(HEADS, HEAD_DIM, D)},
        }

    def mlp(prefix):
        if v1_1:
            return {"gate": {"kernel": w[f"{prefix}.wi_0.weight"].T}, "up": {"kernel": w[f"{prefix}.wi_1.weight"].T},
                    "down": {"kernel": w[f"{prefix}.wo.weight"].T}}
        return {"fc_in": {"kernel": w[f"{prefix}.wi.weight"].T}, "down": {"kernel": w[f"{prefix}.wo.weight"].T}}

    def norm(name):
        return {"scale": w[name]}

    encoder = {"relative_bias": {"table": w["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]},
               "final_norm": norm("encoder.final_layer_norm.weight")}
    for i in range(ENCODER_LAYERS):
        b = f"encoder.block.{i}.layer"
        encoder[f"layer_{i}"] = {"attention": attention(f"{b}.0.SelfAttention"), "attention_norm": norm(f"{b}.0.layer_norm.weight"),
                                 "mlp": mlp(f"{b}.1.DenseReluDense"), "mlp_norm": norm(f"{b}.1.layer_norm.weight")}
    decoder = {"relative_bias": {"table": w["decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]},
               "final_norm": norm("decoder.final_layer_norm.weight")}
    for i in range(DECODER_LAYERS):
        b = f"decoder.block.{i}.layer"
        decoder[f"layer_{i}"] = {
            "attention": attention(f"{b}.0.SelfAttention"), "attention_norm": norm(f"{b}.0.layer_norm.weight"),
            "cross_attention": attention(f"{b}.1.EncDecAttention"), "cross_attention_norm": norm(f"{b}.1.layer_norm.weight"),
            "mlp": mlp(f"{b}.2.DenseReluDense"), "mlp_norm": norm(f"{b}.2.layer_norm.weight"),
        }
    params = {"embed": {"embedding": w["shared.weight"]}, "encoder": encoder, "decoder": decoder}
    if v1_1:
        params["unembed"] = w["lm_head.weight"].T
    return params


def lmjax_model(v1_1: bool):
    changes = ["model.feed_forward=relu", "model.tie_embeddings=true"] if not v1_1 else ["model.tie_embeddings=false"]
    cfg = load_config(None, [
        "model.family=t5", "model.style=t5", f"model.vocab_size={V}", f"model.d_model={D}", f"model.n_heads={HEADS}",
        f"model.head_dim={HEAD_DIM}", f"model.d_ff={FF}", f"model.n_layers={ENCODER_LAYERS}", f"model.decoder_layers={DECODER_LAYERS}",
        "model.norm_eps=1e-6", "model.scan_layers=false", "train.objective=span_corruption", "data.tokenizer.sentinels=10", *changes,
    ])
    return build_model(cfg.model)


@pytest.mark.parametrize("v1_1", [True, False], ids=["t5_v1_1", "t5_original"])
def test_logits_equal_transformers_t5(v1_1):
    hf = hf_model(v1_1)
    model, params = lmjax_model(v1_1), lmjax_params(hf, v1_1)
    rng = np.random.default_rng(0)
    # Longer than the exact buckets on both sides, with encoder padding masked in both models.
    encoder_ids = rng.integers(2, V, (2, 40))
    decoder_ids = rng.integers(2, V, (2, 24))
    attention_mask = np.ones_like(encoder_ids)
    attention_mask[1, 30:] = 0
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor(encoder_ids), attention_mask=torch.tensor(attention_mask),
                      decoder_input_ids=torch.tensor(decoder_ids)).logits.numpy()
    # lmjax masks padding with segment ids: encoder tokens of segment 1, padding 0.
    got = model.apply({"params": params}, jnp.asarray(encoder_ids, jnp.int32), jnp.asarray(decoder_ids, jnp.int32),
                      encoder_segment_ids=jnp.asarray(attention_mask, jnp.int32))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4)


def test_greedy_generation_equals_transformers():
    hf = hf_model(True)
    model, params = lmjax_model(True), lmjax_params(hf, True)
    encoder_ids = np.random.default_rng(1).integers(2, V, (2, 17))
    # Greedy by full recomputation in transformers (its `generate` fails on a cache whose decoder
    # has more layers than the encoder in transformers 5.x).
    expected = np.zeros((2, 1), np.int64)
    with torch.no_grad():
        for _ in range(12):
            logits = hf(input_ids=torch.tensor(encoder_ids), decoder_input_ids=torch.tensor(expected), use_cache=False).logits
            expected = np.concatenate([expected, logits[:, -1].argmax(-1).numpy()[:, None]], axis=1)
    got = generate(model, params, encoder_ids, 12, jax.random.key(0), eos_id=None, decoder_start_id=0)
    np.testing.assert_array_equal(got, expected)
