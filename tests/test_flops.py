"""Parameter and FLOP counting against hand counts and Chinchilla's published table; MFU helpers."""

import dataclasses
import math
from types import SimpleNamespace

import jax
import pytest

from lmjax import cpu_peak, flops
from lmjax.config import ModelConfig, MoEConfig


def test_forward_flops_equal_appendix_f_by_hand():
    # seq 8, d 16, 2 layers, 4 heads of 8 (kh = 32, deliberately != d), ffw 64, vocab 50, 2-matrix MLP.
    embeddings = 12_800  # 2 * 8 * 50 * 16
    qkv = 24_576  # 2 * 3 * 8 * 16 * 32
    logits = 4_096  # 2 * 8^2 * 32
    softmax = 768  # 3 * 4 * 8^2
    values = 4_096  # 2 * 8^2 * 32
    attn_out = 8_192  # 2 * 8 * 32 * 16
    dense = 32_768  # 2 * 8 * (2 * 16 * 64)
    final_logits = 12_800  # 2 * 8 * 16 * 50
    expected = embeddings + 2 * (qkv + logits + softmax + values + attn_out + dense) + final_logits
    assert expected == 174_592
    got = flops.chinchilla_forward_flops(
        seq_len=8, d_model=16, n_layers=2, n_heads=4, head_dim=8, d_ff=64, vocab_size=50
    )
    assert got == expected


def test_gqa_shrinks_only_the_kv_projections():
    shape = dict(seq_len=8, d_model=16, n_layers=1, n_heads=4, head_dim=4, d_ff=64, vocab_size=50)
    mha = flops.chinchilla_forward_terms(**shape)
    gqa = flops.chinchilla_forward_terms(**shape, n_kv_heads=1)
    assert mha["attention_qkv"] == 12_288  # 2 * 3 * 8 * 16 * 16
    assert gqa["attention_qkv"] == 6_144  # Q: 2 * 8 * 16 * 16 = 4096; K and V: 2 * (2 * 8 * 16 * 1 * 4) = 2048
    assert {k: v for k, v in gqa.items() if k != "attention_qkv"} == {k: v for k, v in mha.items() if k != "attention_qkv"}


# Chinchilla Table A4 shapes (num layers, d_model, ffw, heads, k/q size, also Table A9 rows), the model
# size Table A9 reports for each shape, and the Table A4 ratio of their FLOP count to 6ND.
TABLE_A4 = [
    (10, 640, 2560, 10, 64, 74e6, 1.03),
    (20, 1024, 4096, 16, 64, 306e6, 1.10),
    (24, 1280, 5120, 10, 128, 552e6, 1.08),
    (26, 1792, 7168, 14, 128, 1143e6, 1.04),
    (28, 2048, 8192, 16, 128, 1593e6, 1.03),
    (40, 3584, 14336, 28, 128, 6796e6, 0.99),
]


@pytest.mark.parametrize("layers, d_model, ffw, heads, head_dim, n_params, ratio", TABLE_A4)
def test_chinchilla_table_a4_ratio_to_6nd(layers, d_model, ffw, heads, head_dim, n_params, ratio):
    seq, vocab = 2048, 32_000
    terms = flops.chinchilla_forward_terms(seq, d_model, layers, heads, head_dim, ffw, vocab)
    # The table is reproduced with N = the reported model size and the transformer-block terms only:
    # the paper's numbers leave out the embedding and final-logits terms that appendix F lists.
    blocks = sum(v for k, v in terms.items() if k not in ("embedding", "logits"))
    assert 3 * blocks / (6 * n_params * seq) == pytest.approx(ratio, abs=0.01)
    if d_model == 640:  # with those two terms in, the smallest model is far off the table
        assert 3 * sum(terms.values()) / (6 * n_params * seq) > 1.5


LLAMA = ModelConfig(style="llama", vocab_size=100, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=40)


def test_param_counts_llama_by_hand():
    # Per layer: q 16*32 = 512, k and v 16*16 = 256 each, o 32*16 = 512, SwiGLU 3*16*40 = 1920,
    # two RMSNorm scales 2*16 = 32 -> 3488; two layers 6976; final norm 16; token table 100*16 = 1600.
    tied = flops.param_counts(LLAMA)
    assert tied == {"total": 8592, "embedding": 1600, "non_embedding": 6992, "output_head": 0, "active": 8592}
    untied = flops.param_counts(dataclasses.replace(LLAMA, tie_embeddings=False))
    assert untied == {"total": 10192, "embedding": 1600, "non_embedding": 8592, "output_head": 1600, "active": 10192}


def test_param_counts_gpt2_by_hand():
    cfg = ModelConfig(style="gpt2", vocab_size=100, d_model=16, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32)
    # Per layer: q, k, v, o each 16*16 + 16 = 272 -> 1088; MLP 16*64 + 64 = 1088 and 64*16 + 16 = 1040;
    # two LayerNorms 2*(16+16) = 64 -> 3280; two layers 6560; final LayerNorm 32;
    # token table 1600 + positions 32*16 = 512 -> 2112.
    assert flops.param_counts(cfg) == {"total": 8704, "embedding": 2112, "non_embedding": 6592, "output_head": 0, "active": 8704}
    untied = flops.param_counts(dataclasses.replace(cfg, tie_embeddings=False))
    assert untied["total"] == 10304 and untied["output_head"] == 1600 and untied["non_embedding"] == 8192


def test_flops_per_token_for_a_llama_config_by_hand():
    cfg = ModelConfig(style="llama", vocab_size=50, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=24)
    # seq 8, heads of 4: q 2*8*16*16 = 4096; k, v 2*8*16*8 = 2048 each; logits and values 2*64*16 = 2048
    # each; softmax 3*4*64 = 768; output 4096; SwiGLU 2*8*(3*16*24) = 18432 -> 35584 per layer.
    # Forward: 12800 + 2*35584 + 12800 = 96768; training per token: 3 * 96768 / 8 = 36288.
    assert flops.flops_per_token(cfg, seq_len=8) == 36_288
    breakdown = flops.flops_breakdown(cfg, seq_len=8)
    assert breakdown["mlp"] == 13_824  # 3 * 2 * 18432 / 8
    assert breakdown["embedding"] == breakdown["logits"] == 4_800  # 3 * 12800 / 8
    assert breakdown["total"] == 36_288


# LLAMA with 3 layers: layer 0 dense, layers 1 and 2 MoE with 4 experts of width 8 (top-2) + 1 shared.
MOE = dataclasses.replace(
    LLAMA, family="moe", n_layers=3,
    moe=MoEConfig(n_experts=4, top_k=2, d_ff_expert=8, n_shared_experts=1, first_dense_layers=1, interval=1),
)


def test_param_counts_moe_by_hand():
    # Dense layer as in LLAMA: 3488. MoE layer: attention 1536 + norms 32 + router 16*4 = 64 +
    # 4 routed experts 4*(3*16*8) = 1536 + 1 shared 384 -> 3552; active: 2 routed (768) -> 2784.
    # Total 1600 + 3488 + 2*3552 + 16 = 12208; active 1600 + 3488 + 2*2784 + 16 = 10672.
    assert flops.param_counts(MOE) == {
        "total": 12208, "embedding": 1600, "non_embedding": 10608, "output_head": 0, "active": 10672,
    }
    assert flops.six_n_flops_per_token(MOE) == 6 * 10672


def test_flops_per_token_moe_counts_only_active_experts():
    # seq 8. Attention per layer (q 4 heads x 8, kv 2 heads x 8): qkv 8192 + 8192, logits 4096,
    # softmax 768, values 4096, output 8192 -> 33536. Dense SwiGLU (layer 0): 2*8*3*16*40 = 30720.
    # MoE layer: router 2*8*16*4 = 1024; 2 routed + 1 shared experts 3 * 2*8*3*16*8 = 18432.
    # Forward: 25600 + 3*33536 + 30720 + 2*(1024 + 18432) + 25600 = 221440 -> 3 * 221440 / 8 per token.
    assert flops.flops_per_token(MOE, seq_len=8) == 83_040
    breakdown = flops.flops_breakdown(MOE, seq_len=8)
    assert breakdown["moe_router"] == 3 * 2 * 1024 / 8
    assert breakdown["moe_experts"] == 3 * 2 * 18432 / 8
    assert breakdown["mlp"] == 3 * 30720 / 8


def test_six_n_uses_the_hand_count():
    assert flops.six_n_flops_per_token(LLAMA) == 6 * 8592
    assert flops.six_n_flops_per_token(LLAMA, include_embedding=False) == 6 * 6992


def test_bad_shape_is_a_clear_error():
    with pytest.raises(flops.FlopsError, match="seq_len must be a positive integer"):
        flops.chinchilla_forward_flops(0, 16, 2, 4, 4, 64, 50)


def test_mfu_arithmetic():
    # 2000 tokens/s * 3e8 FLOPs/token = 6e11 FLOP/s on a 1e12 FLOP/s device.
    assert flops.mfu(2000, 3e8, 1e12) == pytest.approx(0.6)
    assert math.isnan(flops.mfu(2000, 3e8, float("nan")))
    with pytest.raises(flops.FlopsError, match="peak"):
        flops.mfu(2000, 3e8, 0.0)


@pytest.mark.parametrize(
    "platform, kind, dtype, peak, source",
    [
        ("gpu", "NVIDIA H100 80GB HBM3", "bfloat16", 989.5e12, "table:H100 SXM"),
        ("gpu", "NVIDIA H100 80GB HBM3", "float32", 494.5e12, "table:H100 SXM"),
        ("gpu", "NVIDIA H100 PCIe", "bfloat16", 756.5e12, "table:H100 PCIe"),
        ("gpu", "NVIDIA H200", "bfloat16", 989.5e12, "table:H200 SXM"),
        ("gpu", "NVIDIA GH200 480GB", "bfloat16", 989.5e12, "table:H200 SXM"),
        ("gpu", "NVIDIA A100-SXM4-80GB", "bfloat16", 312e12, "table:A100"),
        ("gpu", "NVIDIA A100 80GB PCIe", "float32", 156e12, "table:A100"),
        ("tpu", "TPU v4", "bfloat16", 275e12, "table:TPU v4"),
        ("tpu", "TPU v5 lite", "bfloat16", 197e12, "table:TPU v5e"),
        ("tpu", "TPU v5e", "float32", 197e12, "table:TPU v5e"),
        ("tpu", "TPU v5p", "bfloat16", 459e12, "table:TPU v5p"),
        ("tpu", "TPU v5", "bfloat16", 459e12, "table:TPU v5p"),
        ("tpu", "TPU v6 lite", "bfloat16", 918e12, "table:TPU v6e"),
    ],
)
def test_peak_lookup_by_device_kind(platform, kind, dtype, peak, source):
    device = SimpleNamespace(platform=platform, device_kind=kind)
    assert flops.peak_flops_per_device(device, dtype) == (peak, source)


def test_unknown_accelerator_and_dtype():
    peak, source = flops.peak_flops_per_device(SimpleNamespace(platform="gpu", device_kind="Mystery X1"), "bfloat16")
    assert math.isnan(peak) and source == "unknown:Mystery X1"
    assert flops.chip_for_device_kind("TPU v4 lite") is None
    with pytest.raises(flops.FlopsError, match="float16 is not supported"):
        flops.peak_flops_per_device(SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3"), "float16")


def test_peak_records_say_how_they_were_found(tmp_path, monkeypatch):
    _, _, record = flops.peak_flops_with_record(SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3"), "bfloat16")
    assert record["chip"] == "H100 SXM" and "published dense peak of H100 SXM" in record["summary"]
    peak, _, record = flops.peak_flops_with_record(SimpleNamespace(platform="tpu", device_kind="TPU v9"), "float32")
    assert math.isnan(peak) and record["chip"] is None and "MFU is nan" in record["summary"]
    # CPU: the cached record of lmjax.cpu_peak (tests/test_cpu_peak.py measures it).
    monkeypatch.setattr(cpu_peak, "CPU_PEAK_CACHE", tmp_path / "cpu_peak.json")
    fake = {"backend": "eigen", "results": [{"size": 64, "route": "eigen", "flops_per_sec": [3e10]}]}
    monkeypatch.setattr(cpu_peak, "measure_backend", lambda name, *args, **kwargs: {**fake, "backend": name})
    # One host-wide measurement: each of this process's CPU devices (8 here) gets its share of it.
    devices = jax.local_device_count()
    peak, source, record = flops.peak_flops_with_record(jax.local_devices()[0], "float32")
    assert (peak, source) == (3e10 / devices, "measured-cpu-matmul") and record["best"]["size"] == 64
    assert record["summary"].startswith("30.0 GFLOP/s float32, measured: best of")
    assert record["cpu_devices"] == devices and record["summary"].endswith(f"; shared by {devices} CPU devices")
    assert flops.peak_flops_per_device(jax.local_devices()[0], "float32") == (3e10 / devices, "measured-cpu-matmul")
