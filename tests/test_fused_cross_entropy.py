"""The chunked cross-entropy fused with the readout (lmjax/models/fused_cross_entropy.py,
`model.loss_chunk_tokens`), against the plain logits + logsumexp computation:

- values and gradients (x and W, with a z-loss on log Z) in float32, for chunks that divide the
  tokens, that do not (padding) and that exceed them, W in both layouts, a μP logit multiplier;
  the same for the training loss whose gradients are computed in the forward pass
  (`fused_cross_entropy_loss`), whose per-token outputs carry no gradient;
- the compiled backward holds no float32 array of [tokens, vocab] (the plain one does), and the
  training loss's gradient program has three [tokens, D] x [D, V] matmuls, not four;
- a tiny decoder's causal_lm loss, sums, gradients and eval sums with the key set equal the default
  path's (tied; untied with μP off its base width; MoE), and the parameter tree is unchanged;
- one-line config errors.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax import sharding
from lmjax.config import ConfigError, load_config
from lmjax.models import ModelInputError, build_model, cpu_matmul
from lmjax.models.fused_cross_entropy import fused_cross_entropy, fused_cross_entropy_loss
from lmjax.tasks import CausalLMTask

D, V = 16, 257  # V prime, so no other dimension of the programs below equals it


def inputs(n_tokens: int, seed: int = 0):
    kx, kw, kt = jax.random.split(jax.random.key(seed), 3)
    x_ND = jax.random.normal(kx, (n_tokens, D), jnp.float32)
    w_DV = 0.5 * jax.random.normal(kw, (D, V), jnp.float32)
    return x_ND, w_DV, jax.random.randint(kt, (n_tokens,), 0, V)


def plain_cross_entropy(x_ND, w_DV, targets_N, multiplier=1.0):
    logits_NV = jnp.einsum("nd,dv->nv", x_ND, w_DV, preferred_element_type=jnp.float32) * multiplier
    log_z_N = jax.nn.logsumexp(logits_NV, axis=-1)
    return log_z_N - jnp.take_along_axis(logits_NV, targets_N[:, None], axis=-1)[:, 0], log_z_N


def objective(ce_log_z, weights_N):
    """A weighted loss plus a z-loss: both outputs get a cotangent, the tokens different ones."""
    ce_N, log_z_N = ce_log_z
    return jnp.sum(weights_N * ce_N) + 1e-2 * jnp.sum(weights_N * jnp.square(log_z_N))


@pytest.mark.parametrize("n_tokens,chunk", [(96, 32), (101, 32), (7, 1000)], ids=["divides", "padded", "one-chunk"])
@pytest.mark.parametrize("w_layout", ["dv", "vd"])
@pytest.mark.parametrize("multiplier", [1.0, 0.25])
def test_values_and_gradients_equal_the_plain_computation(n_tokens, chunk, w_layout, multiplier):
    x_ND, w_DV, targets_N = inputs(n_tokens)
    weights_N = jnp.linspace(0.0, 2.0, n_tokens)  # includes a zero weight: a masked token

    def fused(x, w_DV):
        w = w_DV if w_layout == "dv" else w_DV.T  # the gradient reaches w_DV either way
        return fused_cross_entropy(x, w, targets_N, chunk_tokens=chunk, multiplier=multiplier, w_layout=w_layout)

    def plain(x, w_DV):
        return plain_cross_entropy(x, w_DV, targets_N, multiplier)

    for got, want in zip(jax.jit(fused)(x_ND, w_DV), jax.jit(plain)(x_ND, w_DV)):
        assert got.shape == want.shape == (n_tokens,) and got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    grad = lambda f: jax.jit(jax.value_and_grad(lambda x, w: objective(f(x, w), weights_N), argnums=(0, 1)))  # noqa: E731
    (loss, (dx, dw)), (loss_ref, (dx_ref, dw_ref)) = grad(fused)(x_ND, w_DV), grad(plain)(x_ND, w_DV)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
    for got, want in ((dx, dx_ref), (dw, dw_ref)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("mesh_overrides", [[], ["mesh.data=4", "mesh.tensor=2"]], ids=["unsplit", "vocab_split"])
def test_target_logit_outside_the_vocabulary_is_zero_and_a_vocab_split_mesh_gives_the_same(mesh_overrides):
    # The target logit is a gather where the vocabulary is on one device and the one-hot's masked sum
    # where a mesh splits it (tensor=2 splits the vocab axis); both count a target outside [0, V) as 0.
    x_ND, w_DV, targets_N = inputs(64)
    targets_N = targets_N.at[:3].set(jnp.array([-1, V, -100]))
    fused = jax.jit(lambda x, w: fused_cross_entropy(x, w, targets_N, chunk_tokens=32))
    cfg = load_config(None, mesh_overrides)
    with sharding.activate(sharding.make_mesh(cfg), sharding.axis_rules(cfg)):
        assert sharding.splits("vocab") == bool(mesh_overrides)
        ce_N, log_z_N = fused(x_ND, w_DV)
    np.testing.assert_allclose(ce_N[:3], log_z_N[:3], rtol=1e-6)
    want_ce, want_log_z = plain_cross_entropy(x_ND[3:], w_DV, targets_N[3:])
    np.testing.assert_allclose(ce_N[3:], want_ce, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(log_z_N[3:], want_log_z, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_tokens,chunk", [(96, 32), (101, 32), (7, 1000)], ids=["divides", "padded", "one-chunk"])
@pytest.mark.parametrize("w_layout", ["dv", "vd"])
@pytest.mark.parametrize("multiplier,z_loss", [(1.0, 1e-2), (0.25, 1e-2), (1.0, 0.0)])
def test_training_loss_with_forward_gradients_equals_the_plain_computation(n_tokens, chunk, w_layout, multiplier, z_loss):
    x_ND, w_DV, targets_N = inputs(n_tokens)
    weights_N = jnp.linspace(0.0, 2.0, n_tokens)  # a zero weight included: a masked token

    def fused(x, w_DV):
        w = w_DV if w_layout == "dv" else w_DV.T
        return fused_cross_entropy_loss(x, w, targets_N, weights_N, z_loss=z_loss, chunk_tokens=chunk,
                                        multiplier=multiplier, w_layout=w_layout)

    def plain(x, w_DV):
        ce_N, log_z_N = plain_cross_entropy(x, w_DV, targets_N, multiplier)
        return jnp.sum(weights_N * ce_N) + z_loss * jnp.sum(weights_N * jnp.square(log_z_N)), ce_N, log_z_N

    for got, want in zip(jax.jit(fused)(x_ND, w_DV), jax.jit(plain)(x_ND, w_DV)):  # without differentiation
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    grad = lambda f: jax.jit(jax.value_and_grad(lambda x, w: f(x, w)[0], argnums=(0, 1)))  # noqa: E731
    (loss, (dx, dw)), (loss_ref, (dx_ref, dw_ref)) = grad(fused)(x_ND, w_DV), grad(plain)(x_ND, w_DV)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
    for got, want in ((dx, dx_ref), (dw, dw_ref)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * float(jnp.abs(want).max()))
    # A scaled loss (the train step divides by the token count) scales the gradients.
    dx_half = jax.grad(lambda x: 0.5 * fused(x, w_DV)[0])(x_ND)
    np.testing.assert_allclose(dx_half, 0.5 * dx_ref, rtol=1e-5, atol=1e-6 * float(jnp.abs(dx_ref).max()))
    # The per-token outputs carry no gradient (the backward reads only the loss's cotangent).
    assert not np.any(jax.grad(lambda x: jnp.sum(fused(x, w_DV)[1] + fused(x, w_DV)[2]))(x_ND))


def vocab_matmuls(fn, *args) -> int:
    """Matmuls with the vocabulary in an operand or the result in `fn`'s lowered program: XLA's dots
    and the MKL kernel's calls (a scan body's count once)."""
    text = jax.jit(fn).lower(*args).as_text()
    return sum(1 for line in text.splitlines()
               if ("stablehlo.dot_general" in line or f"@{cpu_matmul.TARGET}(" in line) and re.search(rf"[<x]{V}x", line))


def test_training_loss_computes_three_vocab_matmuls_not_four():
    n_tokens, chunk = 512, 64
    x_ND, w_DV, targets_N = inputs(n_tokens)
    weights_N = jnp.ones(n_tokens)
    per_token = jax.grad(lambda x, w: objective(fused_cross_entropy(x, w, targets_N, chunk_tokens=chunk), weights_N), argnums=(0, 1))
    training = jax.grad(lambda x, w: fused_cross_entropy_loss(x, w, targets_N, weights_N, z_loss=1e-2, chunk_tokens=chunk)[0], argnums=(0, 1))
    assert vocab_matmuls(per_token, x_ND, w_DV) == 4
    assert vocab_matmuls(training, x_ND, w_DV) == 3
    assert max(vocab_buffers(training, x_ND, w_DV)) <= max(chunk, D) * V


def vocab_buffers(fn, *args) -> list[int]:
    """Element counts of the float32 arrays with a vocabulary dimension in `fn`'s compiled program."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    shapes = {tuple(int(d) for d in dims.split(",")) for dims in re.findall(r"f32\[([\d,]+)\]", text)}
    return [int(np.prod(shape)) for shape in shapes if V in shape]


def test_backward_keeps_no_float32_tokens_by_vocab_array():
    n_tokens, chunk = 512, 64
    x_ND, w_DV, targets_N = inputs(n_tokens)
    weights_N = jnp.ones(n_tokens)

    def loss(f):
        return jax.grad(lambda x, w: objective(f(x, w, targets_N), weights_N), argnums=(0, 1))

    fused_grad = loss(lambda x, w, t: fused_cross_entropy(x, w, t, chunk_tokens=chunk))
    plain_grad = loss(plain_cross_entropy)
    # The detector sees the plain program's logits; the fused program's largest is a chunk's
    # logits or dW [D, V], nothing of the tokens' size.
    assert max(vocab_buffers(plain_grad, x_ND, w_DV)) >= n_tokens * V
    assert max(vocab_buffers(fused_grad, x_ND, w_DV)) <= max(chunk, D) * V
    temp = lambda fn: jax.jit(fn).lower(x_ND, w_DV).compile().memory_analysis().temp_size_in_bytes  # noqa: E731
    assert temp(fused_grad) < n_tokens * V * 4 <= temp(plain_grad)


# ----------------------------------------------------------------------------- in the model and the task

VOCAB, SEQ, BATCH = 67, 12, 3
MODELS = {
    "tied": ["model.family=dense", "model.n_kv_heads=2"],
    # untied readout, μP at twice its base width (logits x 1/2)
    "untied-mup": ["model.family=dense", "model.tie_embeddings=false", "model.parameterization=mup", "model.mup_base_width=16"],
    "moe": ["model.family=moe", "model.n_layers=2", "model.moe.n_experts=4", "model.moe.top_k=2", "model.moe.d_ff_expert=16"],
}


def task_cfg(model: str, chunk: int | None):
    return load_config(None, MODELS[model] + [
        f"model.vocab_size={VOCAB}", "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.d_ff=64",
        f"data.seq_len={SEQ}", "train.z_loss=1e-2", f"model.loss_chunk_tokens={'null' if chunk is None else chunk}",
    ])


def task_batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, (BATCH, SEQ + 1))
    loss_mask = (rng.random((BATCH, SEQ)) < 0.8).astype(np.float32)
    segment_ids = np.ones((BATCH, SEQ), np.int32)
    positions = np.broadcast_to(np.arange(SEQ), (BATCH, SEQ))
    return {"tokens": jnp.asarray(tokens[:, :-1], jnp.int32), "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
            "segment_ids": jnp.asarray(segment_ids), "positions": jnp.asarray(positions, jnp.int32), "loss_mask": jnp.asarray(loss_mask)}


@pytest.mark.parametrize("model_name", list(MODELS))
def test_causal_lm_loss_gradients_and_eval_equal_the_logits_path(model_name):
    plain_cfg, fused_cfg = task_cfg(model_name, None), task_cfg(model_name, 10)  # 36 tokens: 4 chunks of 9
    plain_model, fused_model = build_model(plain_cfg.model), build_model(fused_cfg.model)
    batch = task_batch()
    params = nn.unbox(plain_model.init(jax.random.key(0), batch["tokens"])["params"])
    fused_params = nn.unbox(fused_model.init(jax.random.key(0), batch["tokens"])["params"])
    assert jax.tree.map(np.shape, fused_params) == jax.tree.map(np.shape, params)  # checkpoints unchanged

    def loss_and_grads(cfg, model):
        task = CausalLMTask(cfg)
        value_and_grad = jax.value_and_grad(lambda p: task.loss(p, {}, batch, model), has_aux=True)
        return jax.jit(value_and_grad)(params), jax.jit(lambda p: task.eval_sums(p, {}, batch, model, constants))(params)

    constants = {"token_bytes": jnp.arange(VOCAB, dtype=jnp.float32)}
    ((objective_ref, sums_ref), grads_ref), eval_ref = loss_and_grads(plain_cfg, plain_model)
    ((objective_fused, sums), grads), eval_sums = loss_and_grads(fused_cfg, fused_model)
    assert sums.keys() == sums_ref.keys() and eval_sums.keys() == eval_ref.keys()
    np.testing.assert_allclose(objective_fused, objective_ref, rtol=1e-6)
    for key in sums_ref:
        np.testing.assert_allclose(sums[key], sums_ref[key], rtol=1e-6, err_msg=key)
    for key in eval_ref:
        np.testing.assert_allclose(eval_sums[key], eval_ref[key], rtol=1e-6, err_msg=key)
    for path, got in jax.tree_util.tree_leaves_with_path(grads):
        want = dict(jax.tree_util.tree_leaves_with_path(grads_ref))[path]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * float(jnp.abs(want).max()), err_msg=jax.tree_util.keystr(path))


def test_targets_without_the_key_raise():
    cfg = task_cfg("tied", None)
    model, batch = build_model(cfg.model), task_batch()
    params = model.init(jax.random.key(0), batch["tokens"])["params"]
    with pytest.raises(ModelInputError, match="loss_chunk_tokens"):
        model.apply({"params": params}, batch["tokens"], targets=batch["targets"])


@pytest.mark.parametrize("overrides,message", [
    (["model.loss_chunk_tokens=0"], r"model.loss_chunk_tokens must be > 0, got 0"),
    (["model.loss_chunk_tokens=64", "train.objective=dpo"], r"model.loss_chunk_tokens needs a decoder .* got family dense with objective dpo"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
