"""Mixture of experts: the layer against a numpy reference (routing, drop order per document and
capacity group, shared experts), one expert == dense SwiGLU, dropless == capacity without drops,
packed neighbours, auxiliary losses, the scanned layout against the unrolled one, causality,
decoding (which never drops), and expert parallelism (8 fake devices) against an unsharded run."""

import dataclasses
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax import flops, sharding
from lmjax.config import ConfigError, ModelConfig, MoEConfig, load_config
from lmjax.models import build_model, init_cache, moe_aux_loss
from lmjax.models.layers import MLP
from lmjax.models.moe import STATS, MoEFeedForward, load_balancing_loss
from lmjax.tasks import CausalLMTask
from lmjax.train.step import ModelSetup

VOCAB = 64


def tiny(**moe_overrides) -> ModelConfig:
    moe = MoEConfig(**{"n_experts": 4, "top_k": 2, "d_ff_expert": 16, **moe_overrides})
    return ModelConfig(family="moe", vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, d_ff=48, init_std=0.3, moe=moe)


def random_normal(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def layer_params(cfg: ModelConfig, x):
    return nn.unbox(MoEFeedForward(cfg).init(jax.random.key(0), x)["params"])


def apply_layer(cfg: ModelConfig, params, x, positions=None, segments=None, decode=False):
    y, state = MoEFeedForward(cfg, decode=decode).apply({"params": params}, x, positions, segments, mutable=["intermediates"])
    return np.asarray(y), {k: np.asarray(v) for k, v in state["intermediates"][STATS][0].items()}


def packed(lengths_per_row):
    """(positions, segment_ids) [B, T] of documents of these lengths packed in rows, as the data
    pipeline makes them: segment ids 1, 2, ... and positions from 0 in each document."""
    positions = [np.concatenate([np.arange(n) for n in row]) for row in lengths_per_row]
    segments = [np.concatenate([np.full(n, i + 1) for i, n in enumerate(row)]) for row in lengths_per_row]
    return jnp.asarray(np.stack(positions), jnp.int32), jnp.asarray(np.stack(segments), jnp.int32)


# ----------------------------------------------------------------------------- numpy reference


def swiglu(x, gate, up, down):
    a = x @ gate
    return (a / (1 + np.exp(-a)) * (x @ up)) @ down


def reference_layer(cfg: ModelConfig, p, x, capacity=None, positions=None, segments=None):
    """The MoE layer token by token: top-k of the router scores, then experts serve assignments in
    token order (a token's choices in rank order) until `capacity` per capacity group is used up;
    a group is a run of tokens of one segment with the same position // capacity_group (default:
    one segment per row, positions 0, 1, ...)."""
    moe = cfg.moe
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    x = np.asarray(x, np.float64)
    positions = np.broadcast_to(np.arange(x.shape[1]), x.shape[:2]) if positions is None else np.asarray(positions)
    segments = np.ones(x.shape[:2], int) if segments is None else np.asarray(segments)
    logits = x @ p["router"]
    if moe.router_scores == "softmax":
        scores = np.exp(logits - logits.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
    else:
        scores = 1 / (1 + np.exp(-logits))
    y = np.zeros_like(x)
    kept = np.zeros(x.shape[:2] + (moe.top_k,), bool)
    for b in range(x.shape[0]):
        group = None
        for t in range(x.shape[1]):
            if (segments[b, t], positions[b, t] // moe.capacity_group) != group:
                group, served = (segments[b, t], positions[b, t] // moe.capacity_group), np.zeros(moe.n_experts, int)
            chosen = np.argsort(-scores[b, t])[: moe.top_k]
            weights = scores[b, t, chosen]
            if moe.renormalize:
                weights = weights / weights.sum()
            for j, (e, w) in enumerate(zip(chosen, weights)):
                if capacity is None or served[e] < capacity:
                    served[e] += 1
                    kept[b, t, j] = True
                    y[b, t] += w * swiglu(x[b, t], p["gate"][e], p["up"][e], p["down"][e])
            if moe.n_shared_experts:
                s = p["shared"]
                y[b, t] += swiglu(x[b, t], s["gate"]["kernel"], s["up"]["kernel"], s["down"]["kernel"])
    return y, kept


@pytest.mark.parametrize(
    "moe",
    [
        dict(dispatch="capacity", capacity_factor=0.5, capacity_group=12),  # C = ceil(2 * 12 * 0.5 / 4) = 3
        dict(dispatch="capacity", capacity_factor=0.5, capacity_group=12, router_scores="sigmoid", n_shared_experts=1),
        dict(dispatch="capacity", capacity_factor=1.0, capacity_group=6),  # C = ceil(2 * 6 * 1 / 4) = 3
        dict(dispatch="dropless"),
        dict(dispatch="dropless", router_scores="sigmoid", renormalize=False, top_k=3),
    ],
)
@pytest.mark.parametrize("documents", [None, [[5, 7], [9, 2, 1]]])  # one per row, or packed
def test_layer_matches_reference_and_drops_in_documented_order(moe, documents):
    cfg = tiny(**moe)
    x = random_normal((2, 12, cfg.d_model))
    positions, segments = packed(documents) if documents else (None, None)
    params = layer_params(cfg, x)
    capacity = 3 if cfg.moe.dispatch == "capacity" else None
    want, kept = reference_layer(cfg, params, x, capacity, positions, segments)
    got, stats = apply_layer(cfg, params, x, positions, segments)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
    dropped = 1 - kept.mean()
    if capacity is not None:
        assert 0.1 < dropped < 0.9, "the test must drop some assignments and keep others"
    np.testing.assert_allclose(stats["dropped_fraction"], dropped, atol=1e-6)


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_single_expert_top1_equals_dense_swiglu(dispatch):
    # One expert, top-1, capacity_factor 1: C = capacity_group, so nothing can drop.
    cfg = tiny(n_experts=1, top_k=1, renormalize=False, dispatch=dispatch, capacity_factor=1.0)
    x = random_normal((2, 8, cfg.d_model))
    params = layer_params(cfg, x)
    got, stats = apply_layer(cfg, params, x)
    dense_params = {name: {"kernel": params[name][0]} for name in ("gate", "up", "down")}
    want = MLP(dataclasses.replace(cfg, d_ff=16)).apply({"params": dense_params}, x)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert stats["dropped_fraction"] == 0


def model_and_params(cfg: ModelConfig, length: int = 8):
    model = build_model(cfg)
    init = jax.jit(lambda rng: nn.unbox(model.init(rng, jnp.zeros((1, length), jnp.int32))["params"]))
    return model, init(jax.random.key(0))


def forward(model, params, tokens, **kwargs):
    """Jitted apply: one compilation instead of op-by-op dispatch of the scanned layers."""
    return jax.jit(lambda p, t: model.apply({"params": p}, t, **kwargs))(params, tokens)


def random_tokens(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, shape), jnp.int32)


def test_dropless_equals_capacity_when_nothing_drops():
    # capacity_factor = n_experts / top_k gives C = capacity_group: every assignment fits.
    capacity_cfg = tiny(dispatch="capacity", capacity_factor=2.0, n_shared_experts=1)
    dropless_cfg = dataclasses.replace(capacity_cfg, moe=dataclasses.replace(capacity_cfg.moe, dispatch="dropless"))
    model, params = model_and_params(capacity_cfg)
    tokens = random_tokens((2, 12))
    capacity_logits, state = forward(model, params, tokens, mutable=["intermediates"])
    _, metrics = moe_aux_loss(state["intermediates"], capacity_cfg)
    assert metrics["moe/dropped_fraction"] == 0
    dropless_logits = forward(build_model(dropless_cfg), params, tokens)
    np.testing.assert_allclose(capacity_logits, dropless_logits, atol=1e-5, rtol=1e-5)


def test_scanned_layout_equals_unrolled_layers():
    cfg = dataclasses.replace(tiny(first_dense_layers=1, interval=2), n_layers=5)  # MoE layers 2 and 4
    assert cfg.moe.layer_indices(cfg.n_layers) == (2, 4)
    model, scanned = model_and_params(cfg)
    row = lambda tree, i: jax.tree.map(lambda a: a[i], tree)  # noqa: E731
    unrolled = {k: v for k, v in scanned.items() if k not in ("dense_layers", "moe_layers")}
    unrolled["layer_0"] = row(scanned["dense_layers"], 0)
    for group, (dense, moe) in enumerate([(1, 2), (3, 4)]):
        unrolled[f"layer_{dense}"] = row(scanned["moe_layers"]["dense_0"], group)
        unrolled[f"layer_{moe}"] = row(scanned["moe_layers"]["moe"], group)
    tokens = random_tokens((2, 8))
    unrolled_cfg = dataclasses.replace(cfg, scan_layers=False)
    want = forward(build_model(unrolled_cfg), unrolled, tokens)
    np.testing.assert_allclose(forward(model, scanned, tokens), want, atol=1e-5, rtol=1e-5)
    # Both layouts hold exactly the parameters flops.param_counts counts.
    for c, p in ((cfg, scanned), (unrolled_cfg, unrolled)):
        assert sum(a.size for a in jax.tree.leaves(p)) == flops.param_counts(c)["total"]


def test_capacity_mode_stays_causal():
    model, params = model_and_params(tiny(dispatch="capacity", capacity_factor=0.5, capacity_group=8))
    tokens = random_tokens((2, 12))
    t = 6
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % VOCAB)
    apply = jax.jit(lambda t: model.apply({"params": params}, t, mutable=["intermediates"]))
    (before, state), (after, _) = apply(tokens), apply(changed)
    assert moe_aux_loss(state["intermediates"], model.config)[1]["moe/dropped_fraction"] > 0
    np.testing.assert_array_equal(before[:, :t], after[:, :t])
    assert np.abs(before[:, t:] - after[:, t:]).max() > 1e-4


def decode_logits(model, params, tokens, prompt_len: int) -> np.ndarray:
    """Logits of a KV-cache prefill of tokens[:, :prompt_len], then of one call per later token."""
    decode = jax.jit(lambda variables, t: model.apply(variables, t, decode=True, mutable=["cache"]))
    logits, variables = decode({"params": params, "cache": init_cache(model, *tokens.shape)}, tokens[:, :prompt_len])
    chunks = [logits]
    for t in range(prompt_len, tokens.shape[1]):
        logits, variables = decode({"params": params, **variables}, tokens[:, t : t + 1])
        chunks.append(logits)
    return np.concatenate(chunks, axis=1)


def test_prefill_then_single_steps_match_full_forward():
    model, params = model_and_params(tiny(first_dense_layers=1))  # a dense stack, then an MoE stack
    tokens = random_tokens((2, 9))
    np.testing.assert_allclose(decode_logits(model, params, tokens, 5), forward(model, params, tokens), atol=1e-5, rtol=0)


def test_packed_neighbour_does_not_change_a_document():
    # C = ceil(2 * 8 * 1 / 4) = 4 per group of 8 positions: the document's 12 tokens are 2 groups.
    cfg = tiny(dispatch="capacity", capacity_factor=1.0, capacity_group=8)
    document = random_normal((1, 12, cfg.d_model), seed=3)
    # The neighbour floods the experts of the document's first token: 16 copies of it.
    row = jnp.concatenate([jnp.repeat(document[:, :1], 16, axis=1), document], axis=1)
    params = layer_params(cfg, row)
    alone, alone_stats = apply_layer(cfg, params, document, *packed([[12]]))
    beside, beside_stats = apply_layer(cfg, params, row, *packed([[16, 12]]))
    np.testing.assert_allclose(beside[:, 16:], alone, atol=1e-6, rtol=0)
    # Drops happen: each of the neighbour's 2 groups sends 8 assignments to each of two experts, 4 over C.
    assert beside_stats["dropped_fraction"] * 56 == pytest.approx(alone_stats["dropped_fraction"] * 24 + 16, abs=1e-4)
    np.testing.assert_allclose(beside, reference_layer(cfg, params, row, 4, *packed([[16, 12]]))[0], atol=2e-5, rtol=2e-5)
    # The test can fail: with one capacity per row, C = ceil(2 * T * 1 / 4) (the rule before
    # capacity groups), the flood changes the document.
    per_row = lambda x: reference_layer(tiny(dispatch="capacity", capacity_group=x.shape[1]), params, x, math.ceil(x.shape[1] / 2))[0]  # noqa: E731
    assert np.abs(per_row(row)[:, 16:] - per_row(document)).max() > 1e-3


def test_decode_never_drops():
    cfg = tiny(dispatch="capacity", capacity_factor=1.0, capacity_group=8, n_shared_experts=1)
    x = jnp.repeat(random_normal((2, 1, cfg.d_model), seed=4), 8, axis=1)  # every token to the same two experts
    params = layer_params(cfg, x)
    _, stats = apply_layer(cfg, params, x)
    assert stats["dropped_fraction"] == pytest.approx(0.5), "C = 4 of the 8 tokens' assignments per expert"
    got, decode_stats = apply_layer(cfg, params, x, decode=True)
    assert decode_stats["dropped_fraction"] == 0
    np.testing.assert_allclose(got, reference_layer(cfg, params, x)[0], atol=2e-5, rtol=2e-5)


def test_capacity_decode_equals_full_forward():
    # C = ceil(2 * 128 * 1 / 4) = 64 per group of 128 positions (the default capacity_group), so
    # none of these 12 tokens drops. The prompt repeats one token 4 times: every MoE layer sends
    # its 4 tokens to the same two experts, so a capacity computed from the length of the call
    # (ceil(2 * 4 * 1 / 4) = 2 in the prefill) would drop half of their assignments.
    cfg = tiny(dispatch="capacity", capacity_factor=1.0)
    model, params = model_and_params(cfg)
    prompt = jnp.asarray([[5] * 4, [17] * 4], jnp.int32)
    tokens = jnp.concatenate([prompt, random_tokens((2, 8), seed=2)], axis=1)
    full, state = forward(model, params, tokens, mutable=["intermediates"])
    assert moe_aux_loss(state["intermediates"], cfg)[1]["moe/dropped_fraction"] == 0
    np.testing.assert_allclose(decode_logits(model, params, tokens, 4), full, atol=1e-5, rtol=0)


def test_packed_rows_keep_documents_apart():
    # The model hands each MoE layer the positions and segment ids: a document packed after a
    # neighbour that floods its experts (13 copies of its first token) keeps its logits.
    cfg = tiny(dispatch="capacity", capacity_factor=1.0, capacity_group=8)
    model, params = model_and_params(cfg)
    document = random_tokens((1, 12), seed=5)
    row = jnp.concatenate([jnp.repeat(document[:, :1], 13, axis=1), document], axis=1)
    apply = jax.jit(lambda *inputs: model.apply({"params": params}, *inputs, mutable=["intermediates"]))
    dropped = lambda state: moe_aux_loss(state["intermediates"], cfg)[1]["moe/dropped_fraction"]  # noqa: E731
    (alone, alone_state), (beside, state) = apply(document, *packed([[12]])), apply(row, *packed([[13, 12]]))
    assert dropped(state) * 25 > dropped(alone_state) * 12, "the neighbour's flood must drop"
    np.testing.assert_allclose(beside[:, 13:], alone, atol=1e-5, rtol=0)


def test_generation_never_drops():
    # One repeated token sends every token to the same two experts in every MoE layer: the full
    # forward drops (C = 4 per group of 8), the KV-cache calls (prefill and steps) do not.
    cfg = tiny(dispatch="capacity", capacity_factor=1.0, capacity_group=8)
    model, params = model_and_params(cfg)
    tokens = jnp.full((2, 10), 5, jnp.int32)
    _, state = forward(model, params, tokens, mutable=["intermediates"])
    assert moe_aux_loss(state["intermediates"], cfg)[1]["moe/dropped_fraction"] > 0.2
    dropless = build_model(dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, dispatch="dropless")))
    want = forward(dropless, params, tokens)
    np.testing.assert_allclose(decode_logits(model, params, tokens, 8), want, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- auxiliary losses


def test_load_balancing_loss_is_one_when_uniform_and_grows_with_skew():
    n_experts, n_tokens = 4, 64
    uniform_probs = jnp.full((n_tokens, n_experts), 1 / n_experts)
    balanced = jnp.arange(n_tokens * 2).reshape(n_tokens, 2) % n_experts  # every expert chosen 32 times
    assert float(load_balancing_loss(uniform_probs, balanced)) == pytest.approx(1.0, abs=1e-6)
    values = []
    for skew in (0.0, 0.25, 0.5, 1.0):
        # A fraction `skew` of the tokens picks experts 0 and 1 and puts extra probability on them.
        probs = (1 - skew) * uniform_probs + skew * jnp.array([0.5, 0.5, 0.0, 0.0])
        experts = jnp.where(jnp.arange(n_tokens)[:, None] < skew * n_tokens, jnp.array([0, 1]), balanced)
        f = np.bincount(np.asarray(experts).ravel(), minlength=n_experts) / experts.size
        expected = n_experts * np.sum(f * np.asarray(probs).mean(0))  # Switch eq. 4 by hand
        values.append(float(load_balancing_loss(probs, experts)))
        assert values[-1] == pytest.approx(expected, rel=1e-6)
    assert values[0] == pytest.approx(1.0) and all(b > a for a, b in zip(values, values[1:]))
    assert values[-1] == pytest.approx(2.0)  # two experts take everything: E * 2 * (1/2 * 1/2)


def lm_batch(tokens):
    batch, length = tokens.shape[0], tokens.shape[1] - 1
    return {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": jnp.tile(jnp.arange(length), (batch, 1)),
        "segment_ids": jnp.ones((batch, length), jnp.int32),
        "loss_mask": jnp.ones((batch, length), jnp.float32),
    }


def test_objective_adds_the_aux_losses_and_the_router_gets_their_gradient():
    cfg = dataclasses.replace(tiny(load_balance_loss=0.0, router_z_loss=0.0), n_layers=1, scan_layers=False)
    model, params = model_and_params(cfg)
    batch = lm_batch(random_tokens((2, 9)))
    # The router's input, captured independently of the MoE code: the output of the pre-FFN norm.
    _, captured = forward(model, params, batch["tokens"], capture_intermediates=True, mutable=["intermediates"])
    x = np.asarray(captured["intermediates"]["layer_0"]["mlp_norm"]["__call__"][0], np.float64).reshape(-1, cfg.d_model)
    logits = x @ np.asarray(params["layer_0"]["mlp"]["router"], np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top2 = np.argsort(-probs, axis=-1)[:, :2]
    f = np.bincount(top2.ravel(), minlength=4) / top2.size
    lb = 4 * np.sum(f * probs.mean(0))
    z = np.mean((logits.max(-1) + np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))) ** 2)
    tokens = 16

    def objective(lb_coef, z_coef):
        c = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, load_balance_loss=lb_coef, router_z_loss=z_coef))
        task = CausalLMTask(load_config(None, ["model.family=moe"]))
        return jax.value_and_grad(lambda p: task.loss(p, {}, batch, build_model(c)), has_aux=True)

    both = jax.jit(lambda p: (objective(0.0, 0.0)(p), objective(0.5, 0.25)(p)))
    ((base, _), base_grads), ((with_aux, metrics), grads) = both(params)
    assert float(with_aux - base) == pytest.approx(tokens * (0.5 * lb + 0.25 * z), rel=1e-4)
    assert float(metrics["moe/load_balance_loss"]) / tokens == pytest.approx(lb, rel=1e-5)
    np.testing.assert_allclose(metrics["moe/expert_load/layer0"] / tokens, f, atol=1e-6)
    router_delta = grads["layer_0"]["mlp"]["router"] - base_grads["layer_0"]["mlp"]["router"]
    assert np.abs(base_grads["layer_0"]["mlp"]["router"]).max() > 0  # through the top-k weights
    assert np.abs(router_delta).max() > 1e-4  # through the auxiliary losses
    expert_delta = grads["layer_0"]["mlp"]["up"] - base_grads["layer_0"]["mlp"]["up"]
    np.testing.assert_allclose(expert_delta, 0, atol=1e-6)  # the aux losses only see the router


def test_config_errors_name_the_key():
    for overrides, message in [
        (["model.moe.top_k=5", "model.moe.n_experts=4"], "model.moe.top_k"),
        (["model.moe.top_k=1"], "renormalize"),
        (["model.n_layers=4", "model.moe.interval=3"], "model.moe.interval"),
        (["model.style=gpt2"], "model.style=llama"),
        (["model.moe.capacity_factor=0"], "model.moe.capacity_factor"),
        (["model.moe.capacity_group=0"], "model.moe.capacity_group"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, ["model.family=moe", *overrides])


def test_example_configs_load():
    tiny_cfg = load_config("configs/moe_tiny.yaml")
    assert tiny_cfg.model.family == "moe"
    mixtral = load_config("configs/mixtral_8x7b.yaml").model
    counts = flops.param_counts(mixtral)
    # Mixtral 8x7B (Jiang et al. 2024): 46.7B parameters, 12.9B active per token.
    assert counts["total"] == pytest.approx(46.7e9, rel=0.01)
    assert counts["active"] == pytest.approx(12.9e9, rel=0.01)


# ----------------------------------------------------------------------------- expert parallelism


def train_five_steps(overrides, devices):
    """Losses of 5 steps on one fixed batch, the step's metrics and its compiled HLO text."""
    cfg = load_config(None, overrides)
    setup = ModelSetup.build(cfg, devices)
    host_batch = jax.tree.map(np.asarray, lm_batch(random_tokens((cfg.data.global_batch_size, cfg.data.seq_len + 1))))
    with sharding.activate(setup.mesh, setup.rules):
        state = setup.factory.create(0)
        batch = setup.global_batch(host_batch)
        compiled = setup.train_step().lower(state, batch).compile()
        losses = []
        for _ in range(5):
            state, metrics = compiled(state, batch)
            losses.append(float(metrics["loss"]))
    return losses, jax.device_get(metrics), compiled.as_text()


def test_expert_parallel_equals_unsharded():
    overrides = [
        "model.family=moe", f"model.vocab_size={VOCAB}", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
        "model.d_ff=64", "model.moe.n_experts=8", "model.moe.top_k=2", "data.seq_len=16", "data.global_batch_size=16",
        "optim.lr=1e-2", "optim.warmup_steps=0", "optim.schedule=constant",
    ]
    expert_parallel = ["mesh.data=2", "mesh.expert=4"]  # 2 experts per shard; the batch over all 8 devices
    # Capacity mode drops here (C = ceil(2 * 8 * 1 / 8) = 2 per expert and group of 8 positions,
    # 2 groups per row); the unsharded run of each mode is its reference.
    for dispatch, mode in [("capacity", ["model.moe.capacity_factor=1.0", "model.moe.capacity_group=8"]), ("dropless", [])]:
        mode = [f"model.moe.dispatch={dispatch}", *mode]
        reference, reference_metrics, _ = train_five_steps(overrides + mode + ["mesh.data=1"], jax.devices()[:1])
        assert reference[4] < reference[0] - 0.05, "the losses must move for the comparison to mean anything"
        np.testing.assert_allclose(reference_metrics["moe/expert_load/layer0"].sum(), 1.0, rtol=1e-5)
        assert (reference_metrics["moe/dropped_fraction"] > 0.05) == (dispatch == "capacity")
        losses, metrics, hlo = train_five_steps(overrides + mode + expert_parallel, jax.devices())
        np.testing.assert_allclose(losses, reference, rtol=1e-4, err_msg=dispatch)
        for name in ("moe/load_balance_loss", "moe/router_z_loss", "moe/expert_load/layer1", "moe/dropped_fraction"):
            np.testing.assert_allclose(metrics[name], reference_metrics[name], rtol=1e-4, atol=1e-6, err_msg=name)
        # Tokens move between expert shards: all-gathered, their sums reduce-scattered.
        for collective in ("all-gather", "reduce-scatter"):
            assert re.search(rf"\b{collective}(-start)?\(", hlo), f"{dispatch}: no {collective} in the compiled step"
