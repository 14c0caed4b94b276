"""The encoder family and the masked-LM task: model properties, masking, loss, sharding, training.

Each test compares against something computed independently: a hand count of BERT-base, outputs
of the same model on changed inputs, sampling-error bounds of BERT's recipe, a float64 numpy loss,
an unsharded run.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax import cli, flops
from lmjax.config import MLMConfig, load_config
from lmjax.data import build_data
from lmjax.data.masking import mask_batch, mask_row, word_ids
from lmjax.models import build_model
from lmjax.tasks import MLMTask
from lmjax.train.loop import train
from lmjax.train.step import abstract_params

ENCODER = [
    "model.family=encoder", "model.style=bert", "model.vocab_size=512", "model.d_model=64", "model.n_layers=2",
    "model.n_heads=4", "model.d_ff=128", "model.max_seq_len=64", "model.type_vocab_size=2", "train.objective=mlm",
    "data.seq_len=32",
]


@pytest.fixture(scope="module")
def mlm_overrides(tiny_overrides):
    return tiny_overrides + ENCODER[:1] + ENCODER[1:] + ["optim.lr=3e-3"]


def n_params(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- the model


def test_bert_base_has_the_published_parameter_count():
    cfg = load_config("configs/bert_base.yaml")
    v, d, ff, layers, positions, types = 30522, 768, 3072, 12, 512, 2
    embeddings = v * d + positions * d + types * d + 2 * d  # tables + LayerNorm
    layer = 4 * (d * d + d) + (d * ff + ff) + (ff * d + d) + 2 * (2 * d)  # q, k, v, out; MLP; 2 LayerNorms
    head = d * d + d + 2 * d + v  # transform dense + LayerNorm + output bias (decoder tied)
    by_hand = embeddings + layers * layer + head
    assert by_hand == 109_514_298  # Hugging Face BertForMaskedLM(bert-base-uncased).num_parameters()
    assert flops.param_counts(cfg.model)["total"] == by_hand
    assert n_params(abstract_params(cfg, build_model(cfg.model))) == by_hand  # what the module creates


@pytest.mark.parametrize("changes", [[], ["model.norm_position=pre", "model.positions=rope", "model.tie_embeddings=false"],
                                     ["model.style=llama", "model.scan_layers=false", "model.type_vocab_size=0"]])
def test_counted_parameters_are_the_created_ones(changes):
    cfg = load_config(None, ENCODER + changes)
    assert n_params(abstract_params(cfg, build_model(cfg.model))) == flops.param_counts(cfg.model)["total"]


def _forward(cfg, tokens, segment_ids=None, positions=None):
    model = build_model(cfg.model)
    params = model.init(jax.random.key(0), jnp.zeros((1, tokens.shape[1]), jnp.int32))["params"]
    return lambda t, s=None, p=None: np.asarray(model.apply({"params": params}, jnp.asarray(t), p, s))


@pytest.mark.parametrize("changes", [[], ["model.norm_position=pre", "model.positions=rope"]])
def test_encoder_is_bidirectional_within_a_segment_and_blind_across(changes):
    cfg = load_config(None, ENCODER + changes)
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, 512, size=(1, 16)).astype(np.int32)
    apply = _forward(cfg, tokens)
    base = apply(tokens)
    later = tokens.copy()
    later[0, 12] = (later[0, 12] + 1) % 512
    # A later token changes the outputs at earlier positions (no causal mask).
    assert np.abs(apply(later)[0, :12] - base[0, :12]).max() > 1e-4
    # Two documents packed in a row: changing the second leaves the first's outputs as they are.
    segments = np.array([[1] * 10 + [2] * 6], np.int32)
    positions = np.array([list(range(10)) + list(range(6))], np.int32)
    packed = apply(tokens, segments, positions)
    neighbour = tokens.copy()
    neighbour[0, 10:] = rng.integers(4, 512, size=6)
    np.testing.assert_allclose(apply(neighbour, segments, positions)[0, :10], packed[0, :10], rtol=1e-5, atol=1e-5)
    # ... and equal the first document run alone.
    alone = apply(tokens[:, :10], np.ones((1, 10), np.int32), positions[:, :10])
    np.testing.assert_allclose(packed[0, :10], alone[0], rtol=1e-4, atol=1e-4)
    # Padding (segment 0) changes nothing: the same document followed by padding of any content.
    padded_segments = np.array([[1] * 10 + [0] * 6], np.int32)
    padded = apply(tokens, padded_segments, positions)
    other_padding = neighbour.copy()
    other_padding[0, 10:] = 0
    np.testing.assert_allclose(apply(other_padding, padded_segments, positions)[0, :10], padded[0, :10], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(padded[0, :10], alone[0], rtol=1e-4, atol=1e-4)
    assert np.isfinite(padded).all()


def test_generate_refuses_an_encoder_in_one_line(tmp_path, mlm_overrides, capsys):
    run_dir = tmp_path / "mlm"
    assert cli.main(["train", "configs/bert_tiny.yaml", *mlm_overrides, "train.steps=1", f"run_dir={run_dir}"]) == 0
    capsys.readouterr()
    assert cli.main(["generate", str(run_dir), "--prompt", "def "]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.family=encoder" in err and "expected a decoder" in err


# ----------------------------------------------------------------------------- masking


@pytest.fixture(scope="module")
def mlm_data(tmp_path_factory, data_cache):
    cfg = load_config(None, ENCODER + ["data.seq_len=64", "data.global_batch_size=32", "data.max_documents=60",
                                       "data.val_fraction=0.1", f"data.cache_dir={data_cache}"])
    return cfg, build_data(cfg, MLMTask(cfg).layout)


def test_masking_follows_berts_recipe_within_sampling_error(mlm_data):
    cfg, data = mlm_data
    tables = data.layout.tables
    rows = data.train.windows(np.arange(400), 64, data.tokenizer.pad_id)
    batch = mask_batch(rows, [(7, i) for i in range(400)], cfg.mlm, tables)
    selectable = (rows["segment_ids"] > 0) & ~tables.is_special_V[rows["tokens"]]
    selected = batch["loss_mask"] > 0
    n, k = int(selectable.sum()), int(selected.sum())
    assert n > 20_000
    assert not (selected & ~selectable).any()  # padding, eos and other special tokens never selected
    assert abs(k / n - 0.15) < 4 * math.sqrt(0.15 * 0.85 / n)
    original, corrupted = rows["tokens"][selected], batch["tokens"][selected]
    masked = corrupted == tables.mask_id
    kept = corrupted == original
    replaced = ~masked & ~kept
    # A random replacement equal to the original counts as kept: 10% + 10% / |pool|.
    p_keep = 0.1 + 0.1 / tables.random_pool.size
    for observed, p in ((masked.mean(), 0.8), (kept.mean(), p_keep), (replaced.mean(), 0.1 - 0.1 / tables.random_pool.size)):
        assert abs(observed - p) < 4 * math.sqrt(p * (1 - p) / k), (observed, p)
    assert not tables.is_special_V[corrupted[replaced]].any()  # random tokens are regular tokens
    np.testing.assert_array_equal(batch["tokens"][~selected], rows["tokens"][~selected])  # the rest untouched
    np.testing.assert_array_equal(batch["targets"], rows["tokens"])


def test_whole_word_masking_selects_words_together(mlm_data):
    cfg, data = mlm_data
    tables = data.layout.tables
    settings = MLMConfig(whole_word=True, mask_prob=0.3)
    rows = data.train.windows(np.arange(50), 64, data.tokenizer.pad_id)
    saw_multi_piece_word = False
    for i in range(50):
        tokens, segments = rows["tokens"][i], rows["segment_ids"][i]
        _, selected = mask_row(tokens, segments, np.random.default_rng(i), settings, tables)
        words = word_ids(tokens, (segments > 0) & ~tables.is_special_V[tokens], tables)
        for w in np.unique(words):
            in_word = selected[words == w]
            assert in_word.min() == in_word.max()  # all pieces of a word, or none
            saw_multi_piece_word |= in_word.size > 1 and in_word[0] > 0
    assert saw_multi_piece_word
    # Hand-checked word split on pieces of the tokenizer: "def foo(x):" -> def | ␣foo | ( | x | ):
    ids = np.array(data.tokenizer.encode("def value_1(self, total):\n"), np.int32)
    words = word_ids(ids, np.ones_like(ids, bool), tables)
    text_of_word = {}
    for token, w in zip(ids, words):
        text_of_word[w] = text_of_word.get(w, "") + data.tokenizer.decode([token])
    assert "value_1" in [t.strip() for t in text_of_word.values()]


def test_masked_batches_are_host_independent_and_resume_exactly(mlm_data, check_host_independent_and_resumable):
    cfg, data = mlm_data
    state = check_host_independent_and_resumable(data)
    # A checkpoint written under other masking settings is refused, not silently remasked.
    other_cfg = load_config(None, ENCODER + ["mlm.mask_prob=0.2", "data.seq_len=64", "data.global_batch_size=32",
                                             "data.max_documents=60", "data.val_fraction=0.1", f"data.cache_dir={cfg.data.cache_dir}"])
    other = build_data(other_cfg, MLMTask(other_cfg).layout).train_iterator(0, 1)
    with pytest.raises(ValueError, match="mlm.mask_prob"):
        other.set_state(state)
    other.close()


# ----------------------------------------------------------------------------- loss and training


def test_mlm_loss_equals_a_numpy_reference(mlm_data):
    cfg, data = mlm_data
    task = MLMTask(cfg)
    model = build_model(cfg.model)
    host = next(iter(data.train_iterator(0, 1)))
    batch = {k: jnp.asarray(v[:4]) for k, v in host.items()}
    params = model.init(jax.random.key(1), batch["tokens"])["params"]
    objective, sums = jax.jit(lambda p, b: task.loss(p, {}, b, model))(params, batch)
    logits = np.asarray(model.apply({"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"]), np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    targets, mask = np.asarray(batch["targets"]), np.asarray(batch["loss_mask"]) > 0
    nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    assert float(sums["tokens"]) == mask.sum() > 10
    np.testing.assert_allclose(float(objective), nll[mask].sum(), rtol=1e-5)
    np.testing.assert_allclose(float(sums["loss_sum"]), nll[mask].sum(), rtol=1e-5)
    assert float(sums["mlm_accuracy_sum"]) == (logits.argmax(-1) == targets)[mask].sum()


def read_records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_mlm_sharded_equals_one_device_and_eval_reads_the_run(tmp_path, mlm_overrides, capsys):
    one = load_config(None, mlm_overrides + [f"run_dir={tmp_path / 'one'}", "mesh.data=1"])
    train(one, devices=jax.devices()[:1])
    eight = load_config(None, mlm_overrides + [f"run_dir={tmp_path / 'eight'}", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    summary = train(eight)
    losses = [{r["step"]: r for r in read_records(tmp_path / name) if "loss" in r} for name in ("one", "eight")]
    for step in range(1, 7):
        np.testing.assert_allclose(losses[1][step]["loss"], losses[0][step]["loss"], rtol=1e-4)
        assert 0.0 <= losses[1][step]["mlm_accuracy"] <= 1.0
    assert losses[0][6]["loss"] < losses[0][1]["loss"] - 0.05  # it trains
    for key in ("final_eval_loss", "final_eval_mlm_accuracy", "final_eval_unigram_accuracy", "final_eval_ppl"):
        assert key in summary, key
    assert summary["objective"] == "mlm" and summary["model_family"] == "encoder"
    assert summary["params_total"] == flops.param_counts(eight.model)["total"]
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "eight")]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["eval_loss"] == pytest.approx(summary["final_eval_loss"], rel=1e-5)
    assert evaluated["eval_mlm_accuracy"] == pytest.approx(summary["final_eval_mlm_accuracy"], abs=1e-6)


@pytest.mark.slow
def test_bert_tiny_beats_its_targets(tmp_path):
    """The default bert_tiny run: eval loss < 0.75 ln(V) and MLM accuracy above the unigram baseline."""
    summary = train(load_config("configs/bert_tiny.yaml", [f"run_dir={tmp_path / 'bert'}", "logging.wandb=off", "logging.progress=false"]))
    assert summary["final_eval_loss"] < 0.75 * math.log(2048)
    assert summary["final_eval_mlm_accuracy"] > summary["final_eval_unigram_accuracy"]


def test_unrolled_remat_keeps_gradients():
    # The encoder's unrolled layers under remat run through stacking.run_layer (a custom_vjp).
    models = [build_model(load_config(None, ENCODER + ["model.scan_layers=false", f"model.remat={r}"]).model) for r in ("none", "dots")]
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 16)), jnp.int32)
    params = models[0].init(jax.random.key(0), tokens)["params"]
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(2, 16, 512)), jnp.float32)
    grads = [jax.grad(lambda p, m=m: jnp.sum(m.apply({"params": p}, tokens) * weights))(params) for m in models]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), *grads)
