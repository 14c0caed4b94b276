"""μP (`model.parameterization: mup`, lmjax/models/mup.py), against independent computations:

- at the base width μP is SP bit for bit (init, logits, two AdamW updates), for dense, MoE and encoder;
- off the base width: each weight's measured init std against the hand-computed one, the logits
  against SP's on the same weights divided by the width multiplier (attention: SP's with the query
  rescaled), the zero-init option;
- the learning-rate multipliers against hand-written lists of hidden-matrix names, and the
  optimizer's updates against SP's AdamW (MuAdamW: Adam step / m, decay step unchanged);
- a coordinate check (Yang et al. 2022, TP5; microsoft/mup's `get_coord_data`): after a
  few Adam steps at a fixed learning rate, how far each layer's output and the logits moved stays
  flat across an 8x range of widths under μP and grows under SP;
- one-line config errors.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lmjax.config import ConfigError, load_config
from lmjax.models import build_model
from lmjax.models.layers import Block
from lmjax.models.mup import is_hidden, lr_multipliers
from lmjax.train.optim import decay_mask, make_optimizer

VOCAB, SEQ, BATCH = 64, 16, 4
OPTIM = ["optim.lr=1e-2", "optim.schedule=constant", "optim.warmup_steps=0", "optim.weight_decay=0.1", "optim.grad_clip=1.0"]
FAMILIES = {
    # the tied readout, GQA, head_dim unset (attention scale from mup_base_width)
    "dense": ["model.family=dense", "model.n_kv_heads=2"],
    # routed + shared experts after a dense layer, untied readout
    "moe": ["model.family=moe", "model.n_layers=3", "model.moe.n_experts=4", "model.moe.top_k=2", "model.moe.d_ff_expert=16",
            "model.moe.n_shared_experts=1", "model.moe.first_dense_layers=1", "model.tie_embeddings=false"],
    # BERT: post-norm, biases, learned positions, token types, MLM head, untied readout
    "encoder": ["model.family=encoder", "model.style=bert", "train.objective=mlm", "model.type_vocab_size=2",
                "model.tie_embeddings=false", f"model.max_seq_len={SEQ}"],
}


def make_cfg(family: str, parameterization: str, d_model: int = 32, base: int = 32, extra=()):
    return load_config(None, FAMILIES[family] + OPTIM + [
        f"model.vocab_size={VOCAB}", f"model.d_model={d_model}", "model.n_layers=2" if family != "moe" else "model.n_layers=3",
        "model.n_heads=4", f"model.d_ff={2 * d_model}", f"data.seq_len={SEQ}", f"model.parameterization={parameterization}",
        f"model.mup_base_width={base}", *extra])


def batch(seed: int = 0, batch_size: int = BATCH, length: int = SEQ, vocab: int = VOCAB):
    """Rows of an arithmetic progression mod vocab (a learnable next-token rule), inputs and targets."""
    rng = np.random.default_rng(seed)
    start, stride = rng.integers(0, vocab, (batch_size, 1)), rng.integers(1, 7, (batch_size, 1))
    seq = (start + stride * np.arange(length + 1)) % vocab
    return jnp.asarray(seq[:, :-1], jnp.int32), jnp.asarray(seq[:, 1:], jnp.int32)


def loss_fn(model, params, tokens, targets):
    logits = model.apply({"params": params}, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def flat(tree) -> dict[str, object]:
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


# ----------------------------------------------------------------------------- base width: SP exactly


@pytest.mark.parametrize("family", list(FAMILIES))
def test_mup_at_base_width_is_sp_bit_for_bit(family):
    tokens, targets = batch()
    results = {}
    for parameterization in ("sp", "mup"):
        cfg = make_cfg(family, parameterization)
        model = build_model(cfg.model)
        tx = make_optimizer(cfg, jax.eval_shape(model.init, jax.random.key(0), tokens)["params"])

        @jax.jit
        def init_logits_and_two_updates(key):
            params = nn.unbox(model.init(key, tokens)["params"])
            logits = model.apply({"params": params}, tokens)
            updated, state = params, tx.init(params)
            for _ in range(2):
                grads = jax.grad(lambda p: loss_fn(model, p, tokens, targets))(updated)
                updates, state = tx.update(grads, state, updated)
                updated = optax.apply_updates(updated, updates)
            return params, logits, updated

        results[parameterization] = jax.device_get(init_logits_and_two_updates(jax.random.key(0)))
    (sp_init, sp_logits, sp_updated), (mup_init, mup_logits, mup_updated) = results["sp"], results["mup"]
    assert jax.tree.structure(sp_init) == jax.tree.structure(mup_init)
    for name, sp_leaf in flat(sp_init).items():
        np.testing.assert_array_equal(flat(mup_init)[name], sp_leaf, err_msg=f"init {name}")
    np.testing.assert_array_equal(mup_logits, sp_logits)
    for name, sp_leaf in flat(sp_updated).items():
        np.testing.assert_array_equal(flat(mup_updated)[name], sp_leaf, err_msg=f"after two updates {name}")
        assert not np.array_equal(sp_leaf, flat(sp_init)[name]), f"{name} did not train"


# ----------------------------------------------------------------------------- off the base width


def expected_init_std(name: str, hidden: bool, width_multiplier: float, n_layers: int) -> float:
    """Hand-computed: SP's 0.02 (GPT-2's / sqrt(2 L) on residual writes), times sqrt(1/m) on hidden matrices."""
    std = 0.02
    if name.endswith(("['out']['kernel']", "['down']['kernel']", "['mlp']['down']")):
        std /= (2 * n_layers) ** 0.5
    return std * (width_multiplier**-0.5 if hidden else 1.0)


HIDDEN_NAMES = ("['query']['kernel']", "['key']['kernel']", "['value']['kernel']", "['out']['kernel']", "['gate']['kernel']",
                "['up']['kernel']", "['down']['kernel']", "['fc_in']['kernel']", "['head_dense']['kernel']",
                "['mlp']['router']", "['mlp']['gate']", "['mlp']['up']", "['mlp']['down']")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_init_std_at_four_times_the_base_width(family):
    cfg = make_cfg(family, "mup", d_model=128, base=32)
    params = nn.unbox(jax.jit(build_model(cfg.model).init)(jax.random.key(0), batch()[0])["params"])
    for name, leaf in flat(params).items():
        if name.endswith(("['scale']", "['bias']", "['output_bias']")):
            continue  # ones and zeros, as in SP
        leaf = np.asarray(leaf, np.float64)
        expected = expected_init_std(name, name.endswith(HIDDEN_NAMES), 4.0, cfg.model.n_layers)
        # relative standard error of a std estimate from n normal draws: 1 / sqrt(2 n)
        assert abs(leaf.std() / expected - 1) < 4 / np.sqrt(2 * leaf.size) + 0.01, (name, leaf.std(), expected)


@pytest.mark.parametrize("explicit_head_dim", [True, False])
def test_logits_are_sp_logits_over_width_multiplier(explicit_head_dim):
    """μP at m = 4 on given weights == SP on the same weights, logits / 4. With head_dim fixed the
    attention is SP's; with head_dim growing (unset, n_heads fixed) the scores are sqrt(8) / 32
    instead of 1 / sqrt(32): SP's with the query kernel times sqrt(8 / 32) = 0.5."""
    extra = ["model.head_dim=8"] if explicit_head_dim else []
    mup_cfg, sp_cfg = make_cfg("dense", "mup", 128, 32, extra), make_cfg("dense", "sp", 128, 32, extra)
    tokens = batch()[0]
    params = nn.unbox(jax.jit(build_model(mup_cfg.model).init)(jax.random.key(1), tokens)["params"])
    mup_logits = jax.jit(build_model(mup_cfg.model).apply)({"params": params}, tokens)
    sp_params = params if explicit_head_dim else jax.tree_util.tree_map_with_path(
        lambda path, x: x * 0.5 if jax.tree_util.keystr(path).endswith("['query']['kernel']") else x, params)
    sp_logits = jax.jit(build_model(sp_cfg.model).apply)({"params": sp_params}, tokens)
    assert float(jnp.std(sp_logits)) > 0.05  # the comparison below is not between near-zero numbers
    np.testing.assert_allclose(mup_logits, sp_logits / 4, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_zero_init_zeroes_the_query_and_the_untied_readout(tie_embeddings):
    cfg = make_cfg("dense", "mup", 64, 32, ["model.mup_zero_init=true", f"model.tie_embeddings={str(tie_embeddings).lower()}"])
    params = flat(nn.unbox(jax.jit(build_model(cfg.model).init)(jax.random.key(0), batch()[0])["params"]))
    assert not np.any(params["['layers']['attention']['query']['kernel']"])
    assert np.std(params["['layers']['attention']['key']['kernel']"]) > 0.01
    if tie_embeddings:  # the readout is the token table: it keeps its init
        assert abs(np.std(params["['embed']['embedding']"]) / 0.02 - 1) < 0.05
    else:
        assert not np.any(params["['unembed']"])


# ----------------------------------------------------------------------------- learning rates


# Every parameter of each family's tree (scanned), hidden ones marked: a parameter added to a model
# without a μP rule fails `lr_multipliers`, one added with a rule fails the comparison below.
PARAMETERS = {
    "dense": {
        "embed/embedding": False, "final_norm/scale": False,
        **{f"layers/attention/{m}/kernel": True for m in ("query", "key", "value", "out")},
        **{f"layers/mlp/{m}/kernel": True for m in ("gate", "up", "down")},
        "layers/attention_norm/scale": False, "layers/mlp_norm/scale": False,
    },
    "moe": {
        "embed/embedding": False, "final_norm/scale": False, "unembed": False,
        **{f"{stack}/attention/{m}/kernel": True for stack in ("dense_layers", "moe_layers/moe") for m in ("query", "key", "value", "out")},
        **{f"{stack}/{norm}/scale": False for stack in ("dense_layers", "moe_layers/moe") for norm in ("attention_norm", "mlp_norm")},
        **{f"dense_layers/mlp/{m}/kernel": True for m in ("gate", "up", "down")},
        **{f"moe_layers/moe/mlp/{m}": True for m in ("router", "gate", "up", "down")},
        **{f"moe_layers/moe/mlp/shared/{m}/kernel": True for m in ("gate", "up", "down")},
    },
    "encoder": {
        "embed/embedding": False, "position_embedding": False, "token_type_embedding": False, "unembed": False,
        "output_bias": False, "embed_norm/scale": False, "embed_norm/bias": False,
        "head_dense/kernel": True, "head_dense/bias": False, "head_norm/scale": False, "head_norm/bias": False,
        **{f"layers/attention/{m}/kernel": True for m in ("query", "key", "value", "out")},
        **{f"layers/attention/{m}/bias": False for m in ("query", "key", "value", "out")},
        **{f"layers/mlp/{m}/kernel": True for m in ("fc_in", "down")},
        **{f"layers/mlp/{m}/bias": False for m in ("fc_in", "down")},
        **{f"layers/{norm}/{p}": False for norm in ("attention_norm", "mlp_norm") for p in ("scale", "bias")},
    },
}


def slash_names(tree) -> dict[str, object]:
    return {"/".join(str(k.key) for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lr_multipliers_land_on_exactly_the_hidden_matrices(family):
    cfg = make_cfg(family, "mup", d_model=128, base=32)
    shapes = nn.unbox(jax.eval_shape(build_model(cfg.model).init, jax.random.key(0), batch()[0])["params"])
    multipliers = slash_names(lr_multipliers(cfg.model, shapes))
    assert multipliers == {name: 0.25 if hidden else 1.0 for name, hidden in PARAMETERS[family].items()}
    sp = make_cfg(family, "sp", d_model=128, base=32)
    assert set(slash_names(lr_multipliers(sp.model, shapes)).values()) == {1.0}


def test_a_parameter_without_a_rule_fails():
    key = jax.tree_util.DictKey
    assert is_hidden((key("layers"), key("mlp"), key("down"), key("kernel")))
    assert not is_hidden((key("layers"), key("mlp"), key("down"), key("bias")))
    for path in [("layers", "adapter", "kernel"), ("layers", "mystery_matrix"), ("layers", "attention", "gate")]:
        with pytest.raises(ValueError, match="no rule for parameter"):
            is_hidden(tuple(key(k) for k in path))


@pytest.mark.parametrize("family", ["moe", "encoder"])
def test_mup_updates_scale_the_adam_step_of_hidden_matrices(family):
    """Same gradients, parameters and settings, against SP's optax.adamw with and without weight
    decay: μP's update of a hidden matrix is SP's Adam step times 1/m plus SP's decoupled decay step
    (MuAdamW: lr / m and weight_decay * m, so lr * weight_decay unchanged); the rest are SP's."""
    mup_cfg, sp_cfg = make_cfg(family, "mup", 128, 32), make_cfg(family, "sp", 128, 32)
    no_decay_cfg = make_cfg(family, "sp", 128, 32, ["optim.weight_decay=0"])
    tokens, targets = batch()
    model = build_model(mup_cfg.model)
    boxed = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
    params = nn.unbox(boxed)
    grads = jax.jit(jax.grad(lambda p: loss_fn(model, p, tokens, targets)))(params)
    txs = [make_optimizer(cfg, boxed) for cfg in (mup_cfg, sp_cfg, no_decay_cfg)]
    # SP's optimizer is what it always was (so its checkpoints resume): clipping, then AdamW
    reference = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lambda count: 1e-2, mask=decay_mask(boxed, False)))
    assert jax.tree.structure(txs[1].init(params)) == jax.tree.structure(reference.init(params))
    mup_updates, sp_updates, sp_adam_steps = (
        slash_names(jax.jit(lambda g, p, tx=tx: tx.update(g, tx.init(p), p)[0])(grads, params)) for tx in txs)
    decayed = 0
    for name, sp_update in sp_updates.items():
        decay_step = sp_update - sp_adam_steps[name]
        decayed += bool(np.any(decay_step))
        factor = 0.25 if PARAMETERS[family][name] else 1.0
        np.testing.assert_allclose(mup_updates[name], sp_adam_steps[name] * factor + decay_step, rtol=1e-5, atol=1e-9, err_msg=name)
    assert decayed >= 4  # the weight decay took part


@pytest.mark.parametrize("parameterization", ["sp", "mup"])
def test_router_lr_scale_scales_only_the_router_adam_step(parameterization):
    """moe.router_lr_scale multiplies the router's Adam step (on top of μP's 1/m) and nothing else;
    the decoupled decay step stays as it was."""
    plain = make_cfg("moe", parameterization, 128, 32)
    scaled = make_cfg("moe", parameterization, 128, 32, ["model.moe.router_lr_scale=0.1"])
    tokens, targets = batch()
    model = build_model(plain.model)
    boxed = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
    params = nn.unbox(boxed)
    grads = jax.jit(jax.grad(lambda p: loss_fn(model, p, tokens, targets)))(params)
    no_decay = [make_cfg("moe", parameterization, 128, 32, extra + ["optim.weight_decay=0"]) for extra in ([], ["model.moe.router_lr_scale=0.1"])]
    plain_u, scaled_u, plain_adam, scaled_adam = (
        slash_names(jax.jit(lambda g, p, tx=make_optimizer(cfg, boxed): tx.update(g, tx.init(p), p)[0])(grads, params))
        for cfg in (plain, scaled, *no_decay))
    routers = [name for name in plain_u if name.endswith("mlp/router")]
    assert routers  # the MoE layers after the dense one (stacked when scanned)
    for name in plain_u:
        if name in routers:
            decay_step = plain_u[name] - plain_adam[name]
            np.testing.assert_allclose(scaled_adam[name], 0.1 * plain_adam[name], rtol=1e-5, atol=1e-12, err_msg=name)
            np.testing.assert_allclose(scaled_u[name], 0.1 * plain_adam[name] + decay_step, rtol=1e-5, atol=1e-9, err_msg=name)
        else:
            np.testing.assert_allclose(scaled_u[name], plain_u[name], rtol=1e-6, atol=1e-12, err_msg=name)


# ----------------------------------------------------------------------------- coordinate check

COORD_SEEDS, COORD_STEPS, COORD_LR = 3, 4, 1e-2
MUP_FLAT_WITHIN = 2.0  # μP: largest / smallest movement over the widths, for every layer and the logits
# SP, widest / narrowest movement: the logits' more than μP's bound allows (measured 3.3x for MoE,
# 6x dense, 13x BERT), and most layers' by an order of magnitude (measured 50x to 800x).
SP_LOGITS_GROW_BY, SP_MEDIAN_LAYER_GROWS_BY = 2.5, 10.0


def coord_movements(family: str, parameterization: str, width: int) -> dict[str, float]:
    """Mean |x_t - x_0| over coordinates (and seeds), per layer, of each block's attention, MLP (or
    MoE) and block outputs, of the MLM head's transform and of the logits, after COORD_STEPS Adam
    updates at COORD_LR: microsoft/mup's coordinate check."""
    cfg = make_cfg(family, parameterization, width, 64, [
        "model.head_dim=16", f"model.n_heads={width // 16}", "model.n_kv_heads=null", "model.moe.d_ff_expert=null", "model.vocab_size=256",
        "data.seq_len=32", "model.max_seq_len=32", f"optim.lr={COORD_LR}", "optim.weight_decay=0", "optim.grad_clip=0"])
    model = build_model(cfg.model)
    batches = [batch(seed, 8, 32, 256) for seed in range(COORD_SEEDS)]
    tokens_S, targets_S = jnp.stack([b[0] for b in batches]), jnp.stack([b[1] for b in batches])
    tx = make_optimizer(cfg, jax.eval_shape(model.init, jax.random.key(0), tokens_S[0])["params"])

    def outputs(params, tokens):
        def is_layer(module, method):
            return method == "__call__" and (isinstance(module, Block) or module.name in ("attention", "mlp", "head_dense"))

        logits, state = model.apply({"params": params}, tokens, capture_intermediates=is_layer, mutable=["intermediates"])
        captured = {k: v for k, v in flat(state["intermediates"]).items() if "__call__" in k}
        return {**captured, "logits": logits}

    def movements(key, tokens, targets):
        params = nn.unbox(model.init(key, tokens)["params"])

        def step(_, carry):
            p, state = carry
            updates, state = tx.update(jax.grad(lambda p: loss_fn(model, p, tokens, targets))(p), state, p)
            return optax.apply_updates(p, updates), state

        trained, _ = jax.lax.fori_loop(0, COORD_STEPS, step, (params, tx.init(params)))
        # one forward pass looped over both parameter sets: half the code to compile
        both = jax.lax.map(lambda p: outputs(p, tokens), jax.tree.map(lambda *p: jnp.stack(p), params, trained))
        before, after = jax.tree.map(lambda x: x[0], both), jax.tree.map(lambda x: x[1], both)
        # scanned layers: [n_layers, B, T, D] -> one number per layer
        return {k: jnp.mean(jnp.abs(after[k] - before[k]), axis=(-3, -2, -1)) for k in before}

    # unsafe_rbg: the same normal draws in distribution, compiled in half the time of threefry
    keys = jax.random.split(jax.random.key(0, impl="unsafe_rbg"), COORD_SEEDS)
    compiled = jax.jit(movements)  # one compilation, run per seed (MoE's dropless dispatch does not vmap)
    per_seed = [jax.device_get(compiled(keys[s], tokens_S[s], targets_S[s])) for s in range(COORD_SEEDS)]
    result = {}
    for name in per_seed[0]:
        short = name.replace("['__call__']", "").replace("[0]", "").replace("']['", "/").strip("[]'")
        mean = np.mean([values[name] for values in per_seed], axis=0)
        for layer, value in enumerate(np.atleast_1d(mean)):
            result[f"{short}[{layer}]" if np.ndim(mean) else short] = float(value)
    return result


# Widths 8x apart, head_dim fixed at 16 (4 to 32 or 8 to 64 heads). MoE and post-norm BERT start at
# 128: at 64 (4 heads) their attention still moves ~2x more than in the wide limit (measured 0.058,
# 0.031, 0.020, 0.016, 0.019 at 64 ... 1024 for BERT's first layer), a finite-width effect.
@pytest.mark.parametrize("family, widths", [
    ("dense", (64, 128, 512)),
    pytest.param("moe", (128, 256, 1024), marks=pytest.mark.slow),
    pytest.param("encoder", (128, 256, 1024), marks=pytest.mark.slow),
])
def test_coordinate_check_flat_under_mup_growing_under_sp(family, widths):
    sp_widths = (widths[0], widths[-1])  # SP's growth needs only the two ends (compiling is the cost)
    movement = {"mup": {w: coord_movements(family, "mup", w) for w in widths},
                "sp": {w: coord_movements(family, "sp", w) for w in sp_widths}}
    names = list(movement["mup"][widths[0]])
    assert "logits" in names and len(names) >= 7, names  # every layer's outputs were captured
    report = []
    for name in names:
        mup, sp = [movement["mup"][w][name] for w in widths], [movement["sp"][w][name] for w in sp_widths]
        report.append(f"{name}: mup {np.round(mup, 4)} (max/min {max(mup) / min(mup):.2f}), sp {np.round(sp, 4)} "
                      f"(widest/narrowest {sp[-1] / sp[0]:.1f})")
    print(f"{family}: movement after {COORD_STEPS} Adam steps, widths {widths}:", *report, sep="\n")
    for name in names:
        mup = [movement["mup"][w][name] for w in widths]
        assert max(mup) / min(mup) < MUP_FLAT_WITHIN, "\n".join(report)
    sp_growth = {name: movement["sp"][sp_widths[1]][name] / movement["sp"][sp_widths[0]][name] for name in names}
    assert sp_growth["logits"] > SP_LOGITS_GROW_BY, "\n".join(report)
    assert np.median(list(sp_growth.values())) > SP_MEDIAN_LAYER_GROWS_BY, "\n".join(report)


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("overrides, message", [
    (["model.parameterization=mup"], "model.mup_base_width is required"),
    (["model.parameterization=mup", "model.mup_base_width=0"], "model.mup_base_width must be > 0"),
    (["model.parameterization=mup", "model.mup_base_width=64", "model.family=t5", "model.style=t5", "train.objective=span_corruption",
      "data.tokenizer.sentinels=100"], "model.parameterization=mup is not supported for T5"),
    (["model.parameterization=mup", "model.mup_base_width=66", "model.n_heads=4"], "model.mup_base_width .66. must be a multiple of model.n_heads"),
    (["model.mup_zero_init=true"], "model.mup_zero_init needs model.parameterization=mup"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_mup_with_a_fixed_head_dim_needs_no_divisible_base():
    load_config(None, ["model.parameterization=mup", "model.mup_base_width=66", "model.head_dim=16"])
