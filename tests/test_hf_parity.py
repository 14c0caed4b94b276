"""Hugging Face checkpoints against `transformers` (PyTorch, CPU, float32), for every architecture
lmjax reads and writes, two configurations each.

Each case builds a random `transformers` model, moves every norm weight and bias away from its
1/0 initialisation (so a dropped or swapped norm cannot pass), saves it with `save_pretrained`
and reads the directory with `lmjax.load_model`: the logits must equal transformers' within 1e-4.
Then `import-hf` -> `export-hf` must give back every tensor bit for bit, and transformers'
`from_pretrained` of the export must compute lmjax's logits.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

from lmjax import load_model
from lmjax.config import load_config
from lmjax.generate import generate
from lmjax.hf import convert
from lmjax.hf.configs import HFConfigError, export_model_type
from lmjax.hf.interop import export_hf, import_hf

V = 96
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)

CASES = {
    # GQA, untied head, Llama 3.1's RoPE scaling (original context 16 < the 20 tokens read).
    "llama_gqa_llama3_rope": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **SMALL, num_key_value_heads=2, tie_word_embeddings=False, rms_norm_eps=1e-5,
        rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16})),
    # MHA, tied head, head_dim != hidden / heads, linear RoPE scaling and another theta.
    "llama_mha_tied_linear_rope": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **SMALL, num_key_value_heads=4, head_dim=16, tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "mistral_sliding_window": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(
        **SMALL, num_key_value_heads=2, sliding_window=5)),
    "mistral_no_window_tied": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(
        **SMALL, num_key_value_heads=4, sliding_window=None, tie_word_embeddings=True)),
    "mixtral_top2": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **SMALL, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
    "mixtral_top3_window": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **{**SMALL, "num_hidden_layers": 3}, num_key_value_heads=1, num_local_experts=8, num_experts_per_tok=3, sliding_window=6)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=40)),
    "gpt2_inner_tanh": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=V, n_embd=48, n_layer=3, n_head=3, n_inner=80, n_positions=24, activation_function="gelu_pytorch_tanh",
        layer_norm_epsilon=1e-6)),
    "bert": lambda: transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, max_position_embeddings=40)),
    "bert_untied_three_types": lambda: transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=V, hidden_size=48, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, max_position_embeddings=24,
        type_vocab_size=3, tie_word_embeddings=False, layer_norm_eps=1e-6)),
    "t5_v1_1": lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0)),
    "t5_original": lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=V, d_model=32, d_kv=16, d_ff=40, num_layers=3, num_heads=2, feed_forward_proj="relu",
        relative_attention_num_buckets=8, relative_attention_max_distance=16, decoder_start_token_id=0)),
}


def random_hf_model(case: str):
    torch.manual_seed(0)
    model = CASES[case]().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            lowered = name.lower()
            if "norm" in lowered or "ln_" in lowered or name.endswith("bias") or "relative_attention_bias" in name:
                p.add_(torch.randn_like(p) * 0.3)
        if case == "bert_untied_three_types":
            # Untied, transformers 5 reads the output bias from decoder.bias and leaves
            # cls.predictions.bias unused (4.x tied the two): keep them one bias, as in real checkpoints.
            model.cls.predictions.bias.copy_(model.cls.predictions.decoder.bias)
    return model


def inputs(case: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    ids = rng.integers(0, V, (2, 20))
    if case.startswith("bert"):
        mask = np.ones_like(ids)
        mask[1, 13:] = 0  # padding masked, in both models
        types = rng.integers(0, 3 if "three" in case else 2, ids.shape)
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    if case.startswith("t5"):
        mask = np.ones_like(ids)
        mask[0, 15:] = 0
        return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": rng.integers(0, V, (2, 11))}
    return {"input_ids": ids}


def hf_logits(model, feed: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return model(**{k: torch.tensor(v) for k, v in feed.items()}).logits.numpy()


def real_positions(case: str, feed: dict[str, np.ndarray]) -> np.ndarray:
    """Where logits mean something: BERT's padded positions are not compared."""
    return feed["attention_mask"].astype(bool) if case.startswith("bert") else np.ones(feed.get("decoder_input_ids", feed["input_ids"]).shape, bool)


def tensors(directory) -> dict[str, np.ndarray]:
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, "numpy") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_transformers_and_export_round_trips(case, tmp_path):
    hf = random_hf_model(case)
    hf.save_pretrained(tmp_path / "hf")
    feed = inputs(case)
    expected = hf_logits(hf, feed)

    lm = load_model(tmp_path / "hf")
    got = np.asarray(lm.logits(**feed))
    where = real_positions(case, feed)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got[where], expected[where], atol=1e-4, rtol=0)

    # import -> export gives back every tensor bit for bit (T5 also writes its head explicitly).
    import_hf(tmp_path / "hf", tmp_path / "run")
    export_hf(tmp_path / "run", tmp_path / "out")
    source, exported = tensors(tmp_path / "hf"), tensors(tmp_path / "out")
    assert set(exported) - set(source) <= ({"lm_head.weight"} if case.startswith("t5") else set())
    assert set(source) <= set(exported)
    for name, array in source.items():
        assert exported[name].dtype == array.dtype and np.array_equal(exported[name].view(np.uint8), array.view(np.uint8)), name

    # transformers reads the export and computes lmjax's logits.
    reloaded = type(hf).from_pretrained(tmp_path / "out").eval()
    np.testing.assert_allclose(hf_logits(reloaded, feed)[where], got[where], atol=1e-4, rtol=0)


@pytest.mark.parametrize("overrides,option", [
    (["model.family=moe", "model.moe.n_shared_experts=1"], "model.moe"),
    (["model.family=moe", "model.moe.router_scores=sigmoid"], "model.moe.router_scores"),
    (["model.style=gpt2", "model.n_kv_heads=2"], "model.n_kv_heads"),
    (["model.style=llama", "model.positions=learned"], "model.style"),
    (["model.family=t5", "model.style=t5", "model.feed_forward=gelu", "train.objective=seq2seq"], "model.feed_forward"),
    (["model.style=gpt2", "model.sliding_window=8"], "model.sliding_window"),
    (["model.family=encoder", "model.style=bert", "model.feed_forward=relu", "train.objective=mlm"], "model.style"),
])
def test_export_refuses_a_model_transformers_cannot_compute(overrides, option):
    """An lmjax model with no Hugging Face equivalent is refused (before anything is written)."""
    cfg = load_config(None, overrides)
    with pytest.raises(HFConfigError, match=option.replace(".", r"\.")):
        export_model_type(cfg.model)


def test_greedy_generation_equals_transformers(tmp_path):
    hf = random_hf_model("llama_gqa_llama3_rope")
    hf.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "run")
    lm = load_model(tmp_path / "run")
    prompt = np.random.default_rng(2).integers(3, V, (2, 7))
    hf.generation_config.eos_token_id = None  # run the full length, as lmjax does without eos_id
    with torch.no_grad():
        expected = hf.generate(torch.tensor(prompt), do_sample=False, max_new_tokens=12, min_new_tokens=12,
                               attention_mask=torch.ones(prompt.shape, dtype=torch.long)).numpy()
    got = generate(lm.module, lm.params, prompt, 12, jax.random.key(0), eos_id=None)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("case,mesh", [
    ("llama_gqa_llama3_rope", ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"]),
    ("mixtral_top2", ["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2", "mesh.expert=2"]),
])
def test_sharded_import_equals_unsharded(case, mesh, tmp_path, monkeypatch):
    """Onto 8 fake devices, sharded over fsdp/tensor(/expert), the parameters are the unsharded
    ones bit for bit, with a per-layer cache so small that every device shard re-reads its layers."""
    hf = random_hf_model(case)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")  # several files, an index
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    from flax import traverse_util

    monkeypatch.setattr(convert, "LAYER_CACHE_BYTES", 1)
    sharded = load_model(tmp_path / "hf", mesh)
    reference = load_model(tmp_path / "hf")  # default mesh: data-parallel, every parameter whole on each device
    flat_sharded = traverse_util.flatten_dict(sharded.params, sep="/")
    flat_reference = traverse_util.flatten_dict(reference.params, sep="/")
    assert flat_sharded.keys() == flat_reference.keys()
    split = 0
    for name, array in flat_sharded.items():
        assert np.array_equal(np.asarray(array), np.asarray(flat_reference[name])), name
        split += array.addressable_shards[0].data.shape != array.shape
    assert split >= len(flat_sharded) // 2, "most parameters should be split over the devices"
    feed = inputs(case)
    np.testing.assert_allclose(np.asarray(sharded.logits(**feed)), np.asarray(reference.logits(**feed)), atol=1e-5, rtol=0)


def test_export_reads_a_run_whose_mesh_does_not_fit_these_devices(tmp_path):
    """A run trained on one device (mesh.data=1) exports from a process with 8 devices."""
    hf = random_hf_model("gpt2")
    hf.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "run")
    run = tmp_path / "run"
    config = (run / "config.yaml").read_text()
    assert "  data: -1\n" in config
    (run / "config.yaml").write_text(config.replace("  data: -1\n", "  data: 1\n"))
    export_hf(run, tmp_path / "out")
    source, exported = tensors(tmp_path / "hf"), tensors(tmp_path / "out")
    assert all(np.array_equal(exported[name], array) for name, array in source.items())


@pytest.mark.parametrize("case", ["llama_mha_tied_linear_rope", "gpt2"])
def test_a_head_the_files_hold_apart_from_the_table_is_untied(case, tmp_path):
    """config.json says tied, but the files give lm_head its own values: transformers 5 keeps them
    apart, and so must lmjax (and export writes the head back)."""
    from safetensors.torch import load_file, save_file

    hf = random_hf_model(case)
    hf.save_pretrained(tmp_path / "hf")
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    assert "lm_head.weight" not in weights
    table = weights["model.embed_tokens.weight" if case.startswith("llama") else "transformer.wte.weight"]
    weights["lm_head.weight"] = table + 0.5 * torch.randn_like(table)
    save_file(weights, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    reread = type(hf).from_pretrained(tmp_path / "hf").eval()
    feed = inputs(case)
    expected = hf_logits(reread, feed)
    assert not np.allclose(expected, hf_logits(hf, feed), atol=1e-3)  # the distinct head matters
    lm = load_model(tmp_path / "hf")
    assert not lm.config.model.tie_embeddings
    np.testing.assert_allclose(np.asarray(lm.logits(**feed)), expected, atol=1e-4, rtol=0)


def test_reads_both_file_layouts(tmp_path):
    """transformers 4's config.json (rope_theta + rope_scaling; T5's tie_word_embeddings standing for
    the rescaled head) and transformers 5's fused Mixtral experts (gate_up_proj [E, 2F, D],
    down_proj [E, D, F], as its modules hold them) read as the layouts save_pretrained writes."""
    import json

    from safetensors.torch import save_file

    # LLaMA with llama3 RoPE scaling, config.json as transformers 4 wrote it.
    hf = random_hf_model("llama_gqa_llama3_rope")
    hf.save_pretrained(tmp_path / "llama")
    config = json.loads((tmp_path / "llama" / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = {"type" if "type" in rope else "rope_type": rope.pop("rope_type"), **rope}
    (tmp_path / "llama" / "config.json").write_text(json.dumps(config))
    feed = inputs("llama_gqa_llama3_rope")
    np.testing.assert_allclose(np.asarray(load_model(tmp_path / "llama").logits(**feed)), hf_logits(hf, feed), atol=1e-4, rtol=0)

    # Original T5 (rescaled tied head), config.json without transformers 5's scale_decoder_outputs.
    hf = random_hf_model("t5_original")
    hf.save_pretrained(tmp_path / "t5")
    config = json.loads((tmp_path / "t5" / "config.json").read_text())
    assert config.pop("scale_decoder_outputs") is True
    (tmp_path / "t5" / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    feed = inputs("t5_original")
    np.testing.assert_allclose(np.asarray(load_model(tmp_path / "t5").logits(**feed)), hf_logits(hf, feed), atol=1e-4, rtol=0)

    # Mixtral's experts fused, as transformers 5's modules hold them; config.json without its RoPE
    # keys (transformers' Mixtral default theta is 1e6, not LLaMA's 1e4).
    hf = random_hf_model("mixtral_top2")
    hf.save_pretrained(tmp_path / "mixtral")
    config = json.loads((tmp_path / "mixtral" / "config.json").read_text())
    assert config.pop("rope_parameters") == {"rope_theta": 1e6, "rope_type": "default"}
    (tmp_path / "mixtral" / "config.json").write_text(json.dumps(config))
    state = {name: p.contiguous() for name, p in hf.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    (tmp_path / "mixtral" / "model.safetensors").unlink()
    save_file(state, tmp_path / "mixtral" / "model.safetensors", metadata={"format": "pt"})
    feed = inputs("mixtral_top2")
    np.testing.assert_allclose(np.asarray(load_model(tmp_path / "mixtral").logits(**feed)), hf_logits(hf, feed), atol=1e-4, rtol=0)


def test_bfloat16_and_mixed_precision_files_round_trip_bit_for_bit(tmp_path):
    """bfloat16 weights with float32 norms (as many checkpoints are stored) import exactly and
    export back in each tensor's own dtype."""
    hf = random_hf_model("llama_gqa_llama3_rope").to(torch.bfloat16)
    with torch.no_grad():
        for name, module in hf.named_modules():
            if name.endswith("norm"):
                module.weight.data = module.weight.data.float()
    hf.save_pretrained(tmp_path / "hf")
    source = tensors(tmp_path / "hf")
    assert {a.dtype.name for a in source.values()} == {"bfloat16", "float32"}
    import_hf(tmp_path / "hf", tmp_path / "run")
    assert load_model(tmp_path / "run").config.model.param_dtype == "float32"  # both widen exactly
    export_hf(tmp_path / "run", tmp_path / "out")
    exported = tensors(tmp_path / "out")
    assert set(exported) == set(source)
    for name, array in source.items():
        assert exported[name].dtype == array.dtype and np.array_equal(exported[name].view(np.uint8), array.view(np.uint8)), name


def test_an_encoder_without_token_types_exports_as_bert(tmp_path):
    """lmjax's BERT-style encoder with no token types (model.type_vocab_size 0) is BertForMaskedLM
    with one all-zero type row: transformers computes lmjax's logits."""
    import json

    from lmjax.hf.convert import export_tensors
    from lmjax.hf.configs import hf_config
    from lmjax.hf.safetensors_io import write_safetensors
    from lmjax.models import build_model

    cfg = load_config(None, ["model.family=encoder", "model.style=bert", "train.objective=mlm", f"model.vocab_size={V}", "model.d_model=32",
                             "model.n_heads=4", "model.n_layers=2", "model.d_ff=48", "model.max_seq_len=32", "model.type_vocab_size=0", "data.seq_len=32"])
    module = build_model(cfg.model)
    params = module.init(jax.random.key(0), np.zeros((1, 8), np.int32))["params"]
    import flax.linen as nn

    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(1), p.shape), nn.unbox(params))  # norms and biases off 1/0
    write_safetensors(tmp_path / "out", export_tensors("bert", cfg.model, params, "float32"))
    (tmp_path / "out" / "config.json").write_text(json.dumps(hf_config(cfg.model, "float32", {})))
    reloaded = transformers.BertForMaskedLM.from_pretrained(tmp_path / "out").eval()
    ids = np.random.default_rng(3).integers(0, V, (2, 16))
    expected = hf_logits(reloaded, {"input_ids": ids})
    np.testing.assert_allclose(np.asarray(module.apply({"params": params}, ids)), expected, atol=1e-4, rtol=0)
