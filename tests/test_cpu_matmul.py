"""The MKL matmul kernel (lmjax/models/matmul_cpu.cc via cpu_matmul): its products against numpy in
float64 for every transpose and for ragged shapes that cut into uneven slabs; `Dense` through it
against XLA's dot (values and gradients, float32); that `model.remat: dots` keeps its products
instead of recomputing them; a model's gradients with `model.matmul: auto` against `xla`; and where it
stands aside (a mesh of several devices, bfloat16, `model.matmul: xla`)."""

import platform
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.config import load_config
from lmjax.models import build_model, cpu_matmul
from lmjax.models.layers import Dense
from lmjax.models.stacking import REMAT_POLICIES
from lmjax.sharding import activate, axis_rules, make_mesh

# The `mkl` extra (in `test`) installs on x86-64 Linux: there the kernel must be available, so no
# test below passes by falling back to XLA's dot unnoticed. Elsewhere there is no MKL wheel.
MKL_PLATFORM = sys.platform == "linux" and platform.machine() == "x86_64"
pytestmark = pytest.mark.skipif(not MKL_PLATFORM, reason="the mkl wheel exists for x86-64 Linux only")


def test_kernel_is_available_with_the_mkl_extra():
    assert cpu_matmul.mkl_library_dir() is not None, "pip install -e '.[test]' installs the mkl extra"
    assert cpu_matmul.available()


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("m,k,n", [(1, 5, 3), (7, 1, 9), (130, 17, 33), (33, 300, 257), (257, 64, 1)])
def test_products_equal_numpy(m, k, n, trans_a, trans_b):
    rng = np.random.default_rng(m * 1000 + n)
    a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(np.float32)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    got = jax.jit(lambda a, b: cpu_matmul.product(a, b, trans_a=trans_a, trans_b=trans_b))(a, b)
    want = (a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b).astype(np.float64)
    assert got.shape == (m, n)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.sqrt(k))


def dense_values_and_grads(matmul: str, in_dims: int, use_bias: bool, dtype=jnp.float32):
    features = (6, 8) if in_dims == 1 else (24,)
    dense = Dense(features, ("embed", "heads", "head_dim")[: in_dims + len(features)], 0.3, in_dims=in_dims,
                  use_bias=use_bias, dtype=dtype, param_dtype=dtype, matmul=matmul)
    x = jax.random.normal(jax.random.key(1), (3, 37, 20) if in_dims == 1 else (3, 37, 4, 5), dtype)
    params = nn.unbox(dense.init(jax.random.key(0), x))
    w = jax.random.normal(jax.random.key(2), (3, 37, *features), dtype)

    def loss(params, x):
        y = dense.apply(params, x)
        return jnp.sum(jnp.tanh(y) * w), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    text = jax.jit(jax.grad(lambda p, x: loss(p, x)[0], argnums=(0, 1))).lower(params, x).as_text()
    return y, grads, cpu_matmul.calls_in(text)


@pytest.mark.parametrize("in_dims,use_bias", [(1, False), (1, True), (2, False)])
def test_dense_equals_xla_dot_values_and_gradients(in_dims, use_bias):
    y, grads, calls = dense_values_and_grads("auto", in_dims, use_bias)
    y_want, grads_want, calls_xla = dense_values_and_grads("xla", in_dims, use_bias)
    assert (calls, calls_xla) == (3, 0)  # forward, input gradient, weight gradient
    np.testing.assert_allclose(y, y_want, rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_want)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bfloat16_dense_keeps_xla_dot():
    *_, calls = dense_values_and_grads("auto", 1, False, dtype=jnp.bfloat16)
    assert calls == 0


@pytest.mark.parametrize("policy,expected_calls", [("dots", 6), ("full", 7)])
def test_remat_dots_saves_the_kernel_products(policy, expected_calls):
    """Two matmuls under jax.checkpoint: 2 forward + 4 backward calls when `dots` saves the products
    (by name, DENSE_OUT); `full` recomputes the first in the backward (the second's product is not
    read there). Without the name, `dots` would recompute it too (7)."""
    x, w1, w2 = (jax.random.normal(jax.random.key(i), s) for i, s in enumerate([(64, 32), (32, 48), (48, 16)]))

    def two_layers(x, w1, w2):
        return cpu_matmul.matmul(jnp.tanh(cpu_matmul.matmul(x, w1)), w2)

    block = jax.checkpoint(two_layers, policy=REMAT_POLICIES[policy])
    grad = jax.grad(lambda *a: jnp.sum(block(*a) ** 2), argnums=(0, 1, 2))
    assert cpu_matmul.calls_in(jax.jit(grad).lower(x, w1, w2).as_text()) == expected_calls
    plain = jax.grad(lambda x, w1, w2: jnp.sum((jnp.tanh(x @ w1) @ w2) ** 2), argnums=(0, 1, 2))
    for got, want in zip(jax.jit(grad)(x, w1, w2), jax.jit(plain)(x, w1, w2)):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def model_loss_and_grads(overrides: list[str]):
    cfg = load_config("configs/dense_tiny.yaml", ["model.remat=dots", "model.scan_layers=false", "model.loss_chunk_tokens=16",
                                                  "model.attention=blockwise", *overrides])
    model = build_model(cfg.model)
    tokens = jax.random.randint(jax.random.key(0), (2, 24), 0, cfg.model.vocab_size)
    params = model.init(jax.random.key(1), tokens)

    def loss(params):  # the training loss: the fused cross-entropy's matmuls run in the kernel too
        targets = jnp.roll(tokens, -1, axis=1)
        return model.apply(params, tokens, targets=targets, target_weights=jnp.full(targets.shape, 1 / targets.size))[0]

    grad_fn = jax.jit(jax.value_and_grad(loss))
    return grad_fn(params), cpu_matmul.calls_in(grad_fn.lower(params).as_text())


def test_decoder_gradients_with_the_kernel_equal_xla():
    (loss, grads), calls = model_loss_and_grads([])
    (loss_xla, grads_xla), calls_xla = model_loss_and_grads(["model.matmul=xla"])
    assert calls > 0 and calls_xla == 0
    np.testing.assert_allclose(loss, loss_xla, rtol=1e-6)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads_xla)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_a_mesh_of_several_devices_keeps_xla_dots():
    """XLA partitions its dots over a mesh; it could not partition the kernel's custom call."""
    cfg = load_config("configs/dense_tiny.yaml", ["mesh.data=2", "mesh.fsdp=4"])
    mesh = make_mesh(cfg)
    x = jax.random.normal(jax.random.key(0), (8, 32))
    w = jax.random.normal(jax.random.key(1), (32, 16))
    with activate(mesh, axis_rules(cfg)):
        assert cpu_matmul.product(x, w) is None and cpu_matmul.matmul(x, w) is None
    assert cpu_matmul.matmul(x, w) is not None
