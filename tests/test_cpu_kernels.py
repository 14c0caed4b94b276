"""The native CPU attention kernel (lmjax/models/attention_cpu.cc via cpu_kernels): that it is what
float32 blockwise attention runs on the CPU, that it equals the XLA-ops path (values and q/k/v
gradients, fp32) at lengths with several ragged tiles, that it runs per shard under a mesh with the
unsharded result (RoPE tables included), and where it stands aside. Its agreement with
jax.nn.dot_product_attention over every mask, and with RoPE, is tests/test_flash_attention.py's
(parametrized over both implementations)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.config import load_config
from lmjax.models import cpu_kernels
from lmjax.models.flash_attention import blockwise_attention
from lmjax.models.rotary import rope_tables
from lmjax.sharding import activate, axis_rules, make_mesh

N, H = 4, 64


def inputs(B, T, K, seed=0, packed=True):
    keys = jax.random.split(jax.random.key(seed), 4)
    q, w = (jax.random.normal(key, (B, T, N, H)) for key in (keys[0], keys[3]))
    k, v = (jax.random.normal(key, (B, T, K, H)) for key in keys[1:3])
    seg = None
    if packed:  # rows of three, two and one documents, boundaries inside tiles
        cuts = [sorted({int(c) for c in np.random.default_rng(seed + b).integers(1, T, size=2 - b % 3)}) for b in range(B)]
        seg = jnp.asarray(np.stack([np.searchsorted(c, np.arange(T), side="right") for c in cuts]).astype(np.int32))
    return q, k, v, w, seg


def values_and_grads(q, k, v, w, seg, **kw):
    def projected(q, k, v):
        out = blockwise_attention(q, k, v, segment_ids_BT=seg, **kw)
        return jnp.sum(out * w), out

    (_, out), grads = jax.jit(jax.value_and_grad(projected, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def assert_close(got, want):
    (out, grads), (out_want, grads_want) = got, want
    np.testing.assert_allclose(out, out_want, atol=2e-6, rtol=1e-5)
    for name, g, g_want in zip("qkv", grads, grads_want):
        np.testing.assert_allclose(g, g_want, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")


def lowered(fn, *args) -> str:
    return jax.jit(fn).lower(*args).as_text()


def test_float32_blockwise_attention_runs_in_the_kernel_and_cpu_kernel_false_does_not():
    q, k, v, _, seg = inputs(2, 40, 2)
    fn = lambda kernel: lambda q, k, v: blockwise_attention(q, k, v, segment_ids_BT=seg, cpu_kernel=kernel)  # noqa: E731
    assert cpu_kernels.FORWARD_TARGET in lowered(fn(True), q, k, v)
    assert cpu_kernels.FORWARD_TARGET not in lowered(fn(False), q, k, v)
    # bfloat16 has no kernel: the XLA ops take it.
    assert cpu_kernels.FORWARD_TARGET not in lowered(fn(True), *(x.astype(jnp.bfloat16) for x in (q, k, v)))


@pytest.mark.parametrize("causal,kv_heads,window,packed,length", [
    (True, 4, None, False, 300),  # several query and key tiles, the last ones ragged; causal tiles skipped
    (True, 1, None, True, 333),  # GQA (all query heads on one KV head), documents crossing tiles
    (True, 2, 70, True, 260),  # a window narrower than a key tile
    (False, 2, None, True, 200),  # bidirectional, packed
])
def test_kernel_equals_the_xla_ops(causal, kv_heads, window, packed, length):
    q, k, v, w, seg = inputs(3, length, kv_heads, packed=packed)
    kw = dict(causal=causal, local_window=window)
    assert_close(values_and_grads(q, k, v, w, seg, cpu_kernel=True, **kw), values_and_grads(q, k, v, w, seg, cpu_kernel=False, **kw))


def test_cross_attention_lengths_equal_the_xla_ops():
    # T != S (no segment ids): queries of one length over keys of another.
    q, _, _, w, _ = inputs(2, 90, 2, packed=False)
    _, k, v, _, _ = inputs(2, 150, 2, seed=1, packed=False)
    kw = dict(causal=False)
    assert_close(values_and_grads(q, k, v, w, None, cpu_kernel=True, **kw), values_and_grads(q, k, v, w, None, cpu_kernel=False, **kw))


def test_kernel_runs_per_shard_under_a_mesh_with_the_unsharded_result():
    # Batch over data x fsdp, heads (query and KV alike) over tensor: 8 devices, each with whole GQA groups.
    cfg = load_config(None, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    mesh = make_mesh(cfg)
    # With RoPE tables: a fourth and fifth operand split over the batch.
    q, k, v, w, seg = inputs(4, 130, 2)
    rope = rope_tables(jnp.broadcast_to(jnp.arange(130), (4, 130)), H, 10000.0)
    want = values_and_grads(q, k, v, w, seg, cpu_kernel=False, rope=rope)
    with activate(mesh, axis_rules(cfg)):
        text = lowered(lambda q, k, v: blockwise_attention(q, k, v, segment_ids_BT=seg, rope=rope), q, k, v)
        got = values_and_grads(q, k, v, w, seg, rope=rope)
    assert cpu_kernels.FORWARD_TARGET in text and "shard_map" in text.replace("sdy.manual_computation", "shard_map")
    assert_close(got, want)


def test_a_mesh_splitting_the_sequence_leaves_attention_to_the_xla_ops():
    cfg = load_config(None, ["mesh.data=2", "mesh.fsdp=4"])
    rules = tuple((name, {"batch": "data", "length": "fsdp"}.get(name, axes)) for name, axes in axis_rules(cfg))
    q, k, v, _, seg = inputs(2, 64, 2)
    with activate(make_mesh(cfg), rules):
        text = lowered(lambda q, k, v: blockwise_attention(q, k, v, segment_ids_BT=seg), q, k, v)
    assert cpu_kernels.FORWARD_TARGET not in text


def test_query_and_kv_heads_split_differently_leave_attention_to_the_xla_ops():
    # A shard would hold query heads whose KV heads are elsewhere. On one device the rules do not matter.
    cfg = load_config(None, ["mesh.data=2", "mesh.tensor=4"])
    rules = tuple((name, None if name == "kv_heads" else axes) for name, axes in axis_rules(cfg))
    q, k, v, _, seg = inputs(2, 64, 2)
    fn = lambda q, k, v: blockwise_attention(q, k, v, segment_ids_BT=seg)  # noqa: E731
    with activate(make_mesh(cfg), rules):
        assert cpu_kernels.FORWARD_TARGET not in lowered(fn, q, k, v)
    one_device = load_config(None, ["mesh.data=1"])
    with activate(make_mesh(one_device, jax.devices()[:1]), rules):
        assert cpu_kernels.FORWARD_TARGET in lowered(fn, q, k, v)


def test_a_batch_the_mesh_does_not_divide_leaves_attention_to_the_xla_ops():
    # shard_map needs even shards; XLA's partitioner pads uneven ones, so the XLA ops still run.
    cfg = load_config(None, ["mesh.data=8"])
    q, k, v, w, seg = inputs(3, 64, 2)
    want = values_and_grads(q, k, v, w, seg, cpu_kernel=False)
    with activate(make_mesh(cfg), axis_rules(cfg)):
        text = lowered(lambda q, k, v: blockwise_attention(q, k, v, segment_ids_BT=seg), q, k, v)
        got = values_and_grads(q, k, v, w, seg)
    assert cpu_kernels.FORWARD_TARGET not in text
    assert_close(got, want)


def test_a_missing_compiler_is_named(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-lmjax")
    with pytest.raises(cpu_kernels.KernelBuildError, match="no C.. compiler: 'no-such-compiler-lmjax' is not on PATH"):
        cpu_kernels.build()
