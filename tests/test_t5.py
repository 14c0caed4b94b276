"""T5 encoder-decoder: relative position buckets, parameter and FLOP counts, attention structure,
cached decoding, and training on the mesh (span corruption and seq2seq through the one trainer)."""

import json
import math
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from lmjax import cli, flops
from lmjax.config import load_config
from lmjax.generate import generate
from lmjax.models import build_model
from lmjax.models.t5 import init_cache, relative_position_buckets
from lmjax.scaling.sweep import InProcessExecutor, sweep_command
from lmjax.tasks import build_task
from lmjax.train.loop import train

T5_TINY = [
    "model.family=t5", "model.style=t5", "model.vocab_size=96", "model.d_model=32", "model.n_layers=2",
    "model.decoder_layers=3", "model.n_heads=4", "model.d_ff=64", "model.tie_embeddings=false",
    "train.objective=span_corruption", "data.tokenizer.sentinels=10",
]


def t5_model(*changes):
    cfg = load_config(None, [*T5_TINY, *changes]).model
    model = build_model(cfg)
    tokens = jnp.zeros((1, 8), jnp.int32)
    params = nn.unbox(model.init(jax.random.key(0), tokens, tokens)["params"])
    # Random relative-bias tables (initialised small) so that position effects are visible.
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: jax.random.normal(jax.random.key(3), x.shape) if "relative_bias" in jax.tree_util.keystr(path) else x, params
    )
    return cfg, model, params


def numpy_bucket(relative: int, bidirectional: bool, num_buckets: int, max_distance: int) -> int:
    """T5's `_relative_position_bucket` for one relative position (memory - query), in plain Python."""
    bucket = 0
    if bidirectional:
        num_buckets //= 2
        if relative > 0:
            bucket += num_buckets
        distance = abs(relative)
    else:
        distance = max(-relative, 0)
    max_exact = num_buckets // 2
    if distance < max_exact:
        return bucket + distance
    large = max_exact + int(math.log(distance / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact))
    return bucket + min(large, num_buckets - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_buckets_equal_t5s_bucketing_beyond_max_distance(bidirectional):
    relative = np.arange(-300, 301)
    got = np.asarray(relative_position_buckets(jnp.asarray(relative)[None, None], bidirectional, 32, 128))[0, 0]
    expected = [numpy_bucket(int(r), bidirectional, 32, 128) for r in relative]
    np.testing.assert_array_equal(got, expected)
    # Keys 128 or more positions back share the last bucket of their direction.
    assert np.all(got[relative <= -128] == (15 if bidirectional else 31))
    if bidirectional:
        assert np.all(got[relative >= 128] == 31)


def test_t5_v1_1_base_has_the_published_parameter_count():
    cfg = load_config("configs/t5_base.yaml").model
    shapes = jax.eval_shape(lambda: build_model(cfg).init(jax.random.key(0), *build_model(cfg).example_inputs(1, 8)))
    created = sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(shapes["params"])))
    assert created == flops.param_counts(cfg)["total"] == 247_577_856  # google/t5-v1_1-base


@pytest.mark.parametrize("changes", [(), ("model.feed_forward=relu", "model.tie_embeddings=true", "model.scan_layers=false")])
def test_counted_parameters_are_the_created_ones(changes):
    cfg, _, params = t5_model(*changes)
    assert sum(x.size for x in jax.tree.leaves(params)) == flops.param_counts(cfg)["total"]


def hand_forward_flops(S, T, d, F, V, N, H, encoder_layers, decoder_layers) -> tuple[float, float]:
    """(forward FLOPs of one example, its embedding part) for a T5 v1.1 of these sizes, written out
    from Chinchilla's appendix F: matmuls 2 x in x out per token, scores and values 2 x T x S x width,
    softmax 3 x heads x T x S, gated MLP of 3 matrices, cross-attention keys/values per encoder token."""
    attention_matmuls = 4 * d * N * H  # q, k, v, o
    encoder = encoder_layers * 2 * (S * (attention_matmuls + 3 * d * F) + 2 * S * S * N * H)
    decoder_self = 2 * (T * (attention_matmuls + 3 * d * F) + 2 * T * T * N * H)
    cross = 2 * (T * 2 * d * N * H + S * 2 * d * N * H + 2 * T * S * N * H)
    decoder = decoder_layers * (decoder_self + cross)
    softmax = 3 * N * (encoder_layers * S * S + decoder_layers * (T * T + T * S))
    embedding, logits = 2 * (S + T) * V * d, 2 * T * d * V
    return encoder + decoder + softmax + embedding + logits, embedding


def test_every_t5_weight_has_logical_axis_names():
    cfg = load_config(None, T5_TINY).model
    model = build_model(cfg)
    tokens = jnp.zeros((1, 8), jnp.int32)
    specs = nn.get_partition_spec(model.init(jax.random.key(0), tokens, tokens))["params"]
    is_spec = lambda s: isinstance(s, jax.sharding.PartitionSpec)  # noqa: E731
    named = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_leaves_with_path(specs, is_leaf=is_spec)}
    for name, spec in named.items():
        assert is_spec(spec), name
        # The relative-bias table's bucket axis is the only unnamed one (32 buckets: kept whole).
        assert None not in spec or (name.endswith("['relative_bias']['table']") and tuple(spec) == (None, "heads")), f"{name}: {spec}"
    decoder = specs["decoder"]["layers"]
    assert tuple(decoder["cross_attention"]["key"]["kernel"]) == ("layers", "embed", "kv_heads", "head_dim")
    assert tuple(decoder["mlp"]["gate"]["kernel"]) == ("layers", "embed", "mlp")
    assert tuple(specs["unembed"]) == ("embed", "vocab")


def test_flops_per_token_equal_a_hand_count():
    cfg = load_config(None, T5_TINY).model
    S, T = 40, 12
    forward, embedding = hand_forward_flops(S, T, 32, 64, 96, 4, 8, encoder_layers=2, decoder_layers=3)
    assert flops.flops_per_token(cfg, S, T) == pytest.approx(3 * forward / (S + T), rel=1e-12)
    assert flops.model_flops_per_token(cfg, S, T) == pytest.approx(3 * (forward - embedding) / (S + T), rel=1e-12)
    with pytest.raises(flops.FlopsError, match="decoder_len"):
        flops.flops_per_token(cfg, S)


def test_encoder_is_bidirectional_decoder_causal_and_packed_pairs_independent():
    cfg, model, params = t5_model()
    rng = np.random.default_rng(0)
    enc = rng.integers(4, 96, (1, 12)).astype(np.int32)
    dec = rng.integers(4, 96, (1, 8)).astype(np.int32)
    logits = lambda e, d, *a: np.asarray(model.apply({"params": params}, jnp.asarray(e), jnp.asarray(d), *a))
    base = logits(enc, dec)
    # Encoder: changing its last token changes every decoder output (bidirectional, read by cross-attention).
    enc2 = enc.copy()
    enc2[0, -1] = (enc[0, -1] + 1) % 96
    assert np.all(np.abs(logits(enc2, dec) - base).max(-1) > 1e-6)
    # Decoder: changing decoder token 5 leaves positions 0..4 untouched and changes 5..7.
    dec2 = dec.copy()
    dec2[0, 5] = (dec[0, 5] + 1) % 96
    diff = np.abs(logits(enc, dec2) - base).max(-1)[0]
    assert np.all(diff[:5] == 0) and np.all(diff[5:] > 1e-6)
    # Packed: pair 1 = (enc[:7], dec[:5]), pair 2 = (enc[7:], dec[5:]); each equals the pair alone.
    enc_seg = np.array([[1] * 7 + [2] * 5]); dec_seg = np.array([[1] * 5 + [2] * 3])
    enc_pos = np.array([list(range(7)) + list(range(5))]); dec_pos = np.array([list(range(5)) + list(range(3))])
    packed = logits(enc, dec, enc_pos, enc_seg, dec_pos, dec_seg)
    np.testing.assert_allclose(packed[:, :5], logits(enc[:, :7], dec[:, :5]), atol=2e-5)
    np.testing.assert_allclose(packed[:, 5:], logits(enc[:, 7:], dec[:, 5:]), atol=2e-5)


@pytest.mark.parametrize("changes", [(), ("model.scan_layers=false", "model.n_kv_heads=2")])
def test_cached_decoding_equals_full_recomputation_token_by_token(changes):
    cfg, model, params = t5_model(*changes)
    rng = np.random.default_rng(1)
    enc = jnp.asarray(rng.integers(4, 96, (2, 10)), jnp.int32)
    dec = jnp.asarray(rng.integers(4, 96, (2, 9)), jnp.int32)
    full = model.apply({"params": params}, enc, dec)
    encoded = model.apply({"params": params}, enc, method=model.encode)
    cache = init_cache(model, 2, 9, 10)
    step_logits = []

    @jax.jit
    def decode(cache, tokens, encoded, positions):
        return model.apply({"params": params, "cache": cache}, tokens, encoded, positions=positions, decode=True, mutable=["cache"],
                           method=model.decode)

    for t, width in ((0, 3), (3, 1), (4, 1), (5, 4)):  # a prefill of 3, then 1, 1 and a chunk of 4
        logits, variables = decode(cache, dec[:, t : t + width], encoded if t == 0 else None, jnp.broadcast_to(t + jnp.arange(width), (2, width)))
        cache = variables["cache"]
        step_logits.append(logits)
    np.testing.assert_allclose(np.concatenate(step_logits, axis=1), full, atol=2e-5)
    # Greedy generation equals the argmax of a full forward pass over what it generated, token by
    # token: the decoder is causal (checked above), so one pass over out[:, :-1] gives every step.
    out = generate(model, params, enc, 8, jax.random.key(0))
    every_step = model.apply({"params": params}, enc, jnp.asarray(out[:, :-1]))
    np.testing.assert_array_equal(out[:, 1:], np.argmax(every_step, -1))


# ----------------------------------------------------------------------------- training through the trainer


@pytest.fixture(scope="module")
def t5_overrides(tiny_overrides):
    """The shared tiny run as a T5 (sizes divide data 2 x fsdp 2 x tensor 2), span corruption on
    32-token inputs (35 raw tokens, 8-token targets)."""
    return tiny_overrides + [
        "model.family=t5", "model.style=t5", "model.decoder_layers=2", "model.n_kv_heads=null", "model.tie_embeddings=false",
        "train.objective=span_corruption", "data.tokenizer.sentinels=100", "optim.lr=3e-3",
    ]


def read_records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_span_corruption_sharded_equals_one_device_and_eval_and_generate_read_the_run(tmp_path, t5_overrides, capsys):
    one = load_config(None, t5_overrides + [f"run_dir={tmp_path / 'one'}", "mesh.data=1"])
    train(one, devices=jax.devices()[:1])
    eight = load_config(None, t5_overrides + [f"run_dir={tmp_path / 'eight'}", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    summary = train(eight)
    losses = [{r["step"]: r for r in read_records(tmp_path / name) if "loss" in r} for name in ("one", "eight")]
    for step in range(1, 7):
        np.testing.assert_allclose(losses[1][step]["loss"], losses[0][step]["loss"], rtol=1e-4)
    assert losses[0][6]["loss"] < losses[0][1]["loss"] - 0.3  # it trains
    assert summary["objective"] == "span_corruption" and summary["model_family"] == "t5"
    # Rows hold 32 encoder and 8 decoder tokens, and FLOPs are counted per token of both.
    assert summary["tokens"] == 6 * 16 * (32 + 8)
    assert summary["flops_per_token"] == pytest.approx(flops.flops_per_token(eight.model, 32, 8), rel=1e-12)
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "eight")]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["eval_loss"] == pytest.approx(summary["final_eval_loss"], rel=1e-5)
    assert evaluated["eval_token_accuracy"] == pytest.approx(summary["final_eval_token_accuracy"], abs=1e-6)
    assert cli.main(["generate", str(tmp_path / "eight"), "--prompt", "def f(x):<extra_id_0> x", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.strip()


def test_encoder_decoder_loss_equals_a_numpy_reference(t5_overrides, tmp_path):
    cfg = load_config(None, t5_overrides + [f"run_dir={tmp_path}"])
    task = build_task(cfg)
    data = task.build_data(cfg)
    batch = data.eval_batches(1)[0]
    model = build_model(cfg.model)
    params = nn.unbox(model.init(jax.random.key(0), *model.example_inputs(1, 32))["params"])
    objective, sums = task.loss(params, {}, {k: jnp.asarray(v) for k, v in batch.items()}, model)
    logits = np.asarray(model.apply({"params": params}, *task.model_inputs(batch)), np.float64)
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    picked = np.take_along_axis(log_probs, batch["targets"][..., None], -1)[..., 0]
    mask = batch["loss_mask"]
    assert float(sums["tokens"]) == mask.sum() > 0
    assert float(sums["loss_sum"]) == pytest.approx(-(picked * mask).sum(), rel=1e-5)
    assert float(objective) == pytest.approx(float(sums["loss_sum"]), rel=1e-7)  # no z-loss, no auxiliary loss


@pytest.mark.slow
def test_t5_tiny_beats_its_target_and_generation_reads_the_prompt(tmp_path, capsys):
    """The default t5_tiny run: eval loss < 0.75 ln(V); greedy outputs differ between prompts (the
    corrupted inputs of held-out rows, as the model saw them in training)."""
    run_dir = tmp_path / "t5"
    cfg = load_config("configs/t5_tiny.yaml", [f"run_dir={run_dir}", "logging.wandb=off", "logging.progress=false"])
    summary = train(cfg)
    assert summary["final_eval_loss"] < 0.75 * math.log(2048)
    data = build_task(cfg).build_data(cfg)
    batch = data.eval_batches(1)[0]
    outputs = set()
    for row in range(4):
        prompt = data.tokenizer.decode(batch["encoder_tokens"][row][batch["encoder_segment_ids"][row] > 0][:-1])  # without eos
        capsys.readouterr()
        assert cli.main(["generate", str(run_dir), "--prompt", prompt, "--max-new-tokens", "16"]) == 0
        outputs.add(capsys.readouterr().out)
    assert len(outputs) > 1


def test_seq2seq_trains_on_packed_jsonl_pairs_on_the_mesh(tmp_path, t5_overrides):
    """Input -> reversed words, several pairs per row: loss falls, tokens count both sides."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    for name, n in (("train.jsonl", 400), ("val.jsonl", 40)):
        with open(tmp_path / name, "w") as f:
            for _ in range(n):
                chosen = list(rng.choice(words, rng.integers(1, 5)))
                f.write(json.dumps({"source": " ".join(chosen), "reversed": " ".join(chosen[::-1])}) + "\n")
    overrides = [o for o in t5_overrides if not o.startswith(("train.objective", "data.max_documents", "data.tokenizer.sentinels"))]
    cfg = load_config(None, overrides + [
        f"run_dir={tmp_path / 'run'}", "train.objective=seq2seq", f"data.paths=[{tmp_path / 'train.jsonl'}]",
        f"data.val_paths=[{tmp_path / 'val.jsonl'}]", "seq2seq.input_key=source", "seq2seq.target_key=reversed",
        "seq2seq.target_len=16", "model.vocab_size=320", "train.steps=12", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
    ])
    summary = train(cfg)
    losses = [r["loss"] for r in read_records(tmp_path / "run") if "loss" in r]
    assert losses[-1] < losses[0] - 0.5
    assert summary["objective"] == "seq2seq" and summary["tokens"] == 12 * 16 * (32 + 16)
    assert summary["data_overlong"] == {"train": {"truncated": 0, "dropped": 0}, "val": {"truncated": 0, "dropped": 0}}
    assert 0.0 < summary["final_eval_token_accuracy"] <= 1.0


@pytest.mark.slow  # minutes of runs: in .ci/run's second pass, out of the README's 15-minute suite
def test_sweep_over_t5_sizes_plans_by_encoder_and_decoder_tokens_and_runs(tmp_path, data_cache):
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "sweep_dir": str(tmp_path / "sweep"),
        "base": str(Path(__file__).resolve().parents[1] / "configs" / "t5_tiny.yaml"),
        "base_overrides": {
            "model.vocab_size": 512, "data.seq_len": 32, "data.global_batch_size": 16, "data.max_documents": 60,
            "data.val_fraction": 0.1, "data.cache_dir": str(data_cache), "train.log_every": 5, "train.eval_every": 0,
            "train.eval_batches": 1, "train.checkpoint_every": 100, "logging.wandb": "off", "logging.progress": False,
        },
        "budgets": [4.0e9, 8.0e9],
        "sizes": [{"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64}, {"d_model": 48, "n_layers": 1, "n_heads": 2, "d_ff": 96},
                  {"d_model": 64, "n_layers": 2, "n_heads": 2, "d_ff": 128}],
        "schedule": {"min_steps": 4, "flops_tolerance": 0.1},
        "fit": {"bootstrap": 0},
    }))
    assert sweep_command(str(sweep_file), [], plan_only=False, executor=InProcessExecutor(devices=jax.devices()[:1])) == 0
    plan = json.loads((tmp_path / "sweep" / "plan.json").read_text())
    assert len(plan["runs"]) == 6
    for entry in plan["runs"]:
        run_dir = tmp_path / "sweep" / "runs" / entry["name"]
        summary = json.loads((run_dir / "summary.json").read_text())
        shape = entry["shape"]
        forward, _ = hand_forward_flops(32, 8, shape["d_model"], shape["d_ff"], 512, shape["n_heads"], shape["d_model"] // shape["n_heads"],
                                        encoder_layers=shape["n_layers"], decoder_layers=shape["n_layers"])
        assert summary["objective"] == "span_corruption"
        assert summary["flops_per_token"] == pytest.approx(3 * forward / 40, rel=1e-12)  # 32 encoder + 8 decoder tokens
        assert summary["tokens"] == entry["tokens"] == entry["steps"] * 16 * 40
        assert summary["train_flops"] == pytest.approx(entry["budget"], rel=0.1)
    assert json.loads((tmp_path / "sweep" / "fit.json").read_text())["n_runs"] == 6


@pytest.mark.parametrize("remat", ["dots", "full"])
def test_unrolled_remat_keeps_gradients(remat):
    # Unrolled layers under remat run through stacking.run_layer (a custom_vjp that orders the
    # recomputation after the cotangent): gradients equal those without remat.
    _, model, params = t5_model("model.scan_layers=false")
    _, rematted, _ = t5_model("model.scan_layers=false", f"model.remat={remat}")
    rng = np.random.default_rng(2)
    enc = jnp.asarray(rng.integers(4, 96, (2, 10)), jnp.int32)
    dec = jnp.asarray(rng.integers(4, 96, (2, 9)), jnp.int32)
    weights = jnp.asarray(rng.normal(size=(2, 9, 96)), jnp.float32)
    grads = [jax.grad(lambda p, m=m: jnp.sum(m.apply({"params": p}, enc, dec) * weights))(params) for m in (model, rematted)]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), *grads)
