"""Parameter counts, FLOPs per token (Chinchilla appendix F) and model FLOP utilisation.

One source for every number a run or a scaling plot claims: the trainer logs `flops_per_token`
and `mfu`, the sweep planner sizes budgets with it, and reports print `flops_breakdown`.

FLOP conventions (Hoffmann et al. 2022, appendix F), generalised to the models lmjax builds:
- Every matmul of an (m x n) by (n x p) counts 2*m*n*p; norms, biases, activations, RoPE and the
  position-table add are not counted (they are O(seq * d), negligible beside the matmuls).
- The token embedding is counted as a matmul with a one-hot input (2 * seq * V * d), as the paper
  does, although lmjax (like every implementation) does a gather that costs no FLOPs.
- Attention is counted over the full seq x seq score matrix, as in the paper, though a causal mask
  lets a kernel skip about half of it. With grouped-query attention (GQA) the K and V projections
  shrink to `n_kv_heads` heads; the score and value products still run for every query head.
- Training = forward + backward = 3 x forward (Kaplan et al. 2020).

Reproducing Chinchilla Table A4 (ratio of this count to 6ND: 73M 1.03, 305M 1.10, ...): the ratios
come out only when N is the model size the paper reports (all parameters, Table A9) and the FLOP
count leaves out the embedding and final-logits terms, although appendix F lists them. With those
terms in, the ratio is 1.58 at 73M. That N counts one V x d matrix, like `param_counts(cfg)["total"]`
of a tied-embedding model. `tests/test_flops.py` checks all six rows. lmjax keeps both terms
(Porian et al. 2024: leaving out the output layer biases small-scale fits).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp

from lmjax import cpu_peak
from lmjax.config import ModelConfig
from lmjax.errors import UserError


class FlopsError(UserError):
    """A counting or peak-lookup request that cannot be answered, reported as one line."""


# ----------------------------------------------------------------------------- parameters


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Every parameter the model holds, split the way scaling-law papers need.

    `embedding` is the token table plus learned position and token-type tables; `output_head` is
    the unembedding matrix when it is not tied to the token table (it is part of `non_embedding`).
    `active` is what one token uses: for MoE, the top_k routed experts (+ shared experts and
    router) of each MoE layer instead of all experts; otherwise `total`. Each model family counts
    its own parameters (`lmjax.models.FAMILIES`).
    """
    return _family(cfg).param_counts(cfg)


def _family(cfg: ModelConfig):
    from lmjax.models import model_family  # models count with this module's helpers: import late

    return model_family(cfg)


def norm_params(cfg: ModelConfig) -> int:
    """One norm: LayerNorm scale + bias (gpt2/bert style) or an RMSNorm scale."""
    return 2 * cfg.d_model if cfg.use_bias else cfg.d_model


def embedding_params(cfg: ModelConfig) -> int:
    """Token table, plus the learned position table and the token-type table when the model has them."""
    positions = cfg.max_seq_len if cfg.position_kind == "learned" else 0
    return (cfg.vocab_size + positions + cfg.type_vocab_size) * cfg.d_model


def output_head_params(cfg: ModelConfig) -> int:
    """The unembedding matrix when it is not tied to the token table."""
    return 0 if cfg.tie_embeddings else cfg.d_model * cfg.vocab_size


def block_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameters of one transformer block by part (attention, mlp, norms), biases included."""
    d, ff = cfg.d_model, cfg.d_ff
    q_width, kv_width = cfg.n_heads * cfg.head_size, cfg.kv_heads * cfg.head_size
    attention = d * q_width + 2 * d * kv_width + q_width * d
    mlp = cfg.mlp_matrices * d * ff
    if cfg.use_bias:
        attention += q_width + 2 * kv_width + d
        mlp += (cfg.mlp_matrices - 1) * ff + d  # a bias on each hidden projection and on the output
    return {"attention": attention, "mlp": mlp, "norms": 2 * norm_params(cfg)}


# ----------------------------------------------------------------------------- FLOPs


def chinchilla_forward_terms(
    seq_len: int,
    d_model: int,
    n_layers: int,
    n_heads: int,
    head_dim: int,
    d_ff: int,
    vocab_size: int,
    n_kv_heads: int | None = None,
    mlp_matrices: int = 2,
) -> dict[str, float]:
    """Forward FLOPs of one sequence, by appendix-F term; layer terms are summed over layers."""
    sizes = {"seq_len": seq_len, "d_model": d_model, "n_layers": n_layers, "n_heads": n_heads,
             "head_dim": head_dim, "d_ff": d_ff, "vocab_size": vocab_size, "mlp_matrices": mlp_matrices}
    if n_kv_heads is not None:
        sizes["n_kv_heads"] = n_kv_heads
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise FlopsError(f"chinchilla_forward_terms: {name} must be a positive integer, got {value!r}")
    kv_heads = n_heads if n_kv_heads is None else n_kv_heads
    seq, d, q_width, kv_width = float(seq_len), float(d_model), float(n_heads * head_dim), float(kv_heads * head_dim)
    layers = float(n_layers)
    return {
        "embedding": 2 * seq * vocab_size * d,
        "attention_qkv": layers * (2 * seq * d * q_width + 2 * 2 * seq * d * kv_width),
        "attention_logits": layers * 2 * seq * seq * q_width,
        "attention_softmax": layers * 3 * n_heads * seq * seq,
        "attention_values": layers * 2 * seq * seq * q_width,
        "attention_output": layers * 2 * seq * q_width * d,
        "mlp": layers * 2 * seq * mlp_matrices * d * d_ff,
        "logits": 2 * seq * d * vocab_size,
    }


def chinchilla_forward_flops(
    seq_len: int,
    d_model: int,
    n_layers: int,
    n_heads: int,
    head_dim: int,
    d_ff: int,
    vocab_size: int,
    n_kv_heads: int | None = None,
    mlp_matrices: int = 2,
) -> float:
    """Forward FLOPs of one sequence: embeddings + layers * (attention + dense) + logits."""
    terms = chinchilla_forward_terms(
        seq_len, d_model, n_layers, n_heads, head_dim, d_ff, vocab_size, n_kv_heads=n_kv_heads, mlp_matrices=mlp_matrices
    )
    return sum(terms.values())


def _model_forward_terms(cfg: ModelConfig, seq_len: int, decoder_len: int | None) -> dict[str, float]:
    """Appendix-F forward terms of one sequence of `cfg`, counted by its model family."""
    family = _family(cfg)
    if family.encoder_decoder:
        return family.forward_terms(cfg, seq_len, decoder_len)
    if decoder_len is not None:
        raise FlopsError(f"decoder_len: model.family={cfg.family} has no separate decoder; expected None, got {decoder_len}")
    return family.forward_terms(cfg, seq_len)


def _tokens(seq_len: int, decoder_len: int | None) -> int:
    """Tokens of one example: its sequence, or encoder plus decoder tokens (encoder-decoders)."""
    return seq_len + (decoder_len or 0)


def flops_breakdown(cfg: ModelConfig, seq_len: int, decoder_len: int | None = None) -> dict[str, float]:
    """Training FLOPs per token (3 x forward / tokens) by term, plus their `total`."""
    tokens = _tokens(seq_len, decoder_len)
    per_token = {name: 3.0 * flops / tokens for name, flops in _model_forward_terms(cfg, seq_len, decoder_len).items()}
    per_token["total"] = sum(per_token.values())
    return per_token


def flops_per_token(cfg: ModelConfig, seq_len: int, decoder_len: int | None = None) -> float:
    """Training FLOPs per token at sequence length `seq_len`, Chinchilla appendix F count. For an
    encoder-decoder, per token of encoder input (`seq_len`) and decoder target (`decoder_len`)."""
    return 3.0 * sum(_model_forward_terms(cfg, seq_len, decoder_len).values()) / _tokens(seq_len, decoder_len)


def model_flops_per_token(cfg: ModelConfig, seq_len: int, decoder_len: int | None = None, forward_passes: float = 3.0) -> float:
    """Training FLOPs per token that the hardware executes as matmuls: the Chinchilla count less
    its embedding terms, which are table lookups (a gather, no FLOPs). MFU and TFLOP/s use this
    (PaLM, Chowdhery et al. 2022, appendix B); compute budgets keep Chinchilla's count.
    `forward_passes`: forward-pass equivalents per trained token, 3 (forward + backward) plus any
    forward pass a task adds (`Task.forward_passes`: DPO's reference model)."""
    terms = _model_forward_terms(cfg, seq_len, decoder_len)
    matmuls = sum(v for k, v in terms.items() if not k.endswith("embedding"))
    return forward_passes * matmuls / _tokens(seq_len, decoder_len)


def six_n_flops_per_token(cfg: ModelConfig, include_embedding: bool = True) -> float:
    """The 6N approximation (Kaplan et al. 2020) with N the active parameters (all of them for a
    dense model); N without embeddings when `include_embedding` is False."""
    counts = param_counts(cfg)
    return 6.0 * (counts["active"] if include_embedding else counts["active"] - counts["embedding"])


# ----------------------------------------------------------------------------- peak FLOP/s and MFU

# Dense (no structured sparsity) peak FLOP/s per chip. NVIDIA datasheets quote tensor-core numbers
# "with sparsity"; the dense peak is half of that. float32 on GPU uses the TF32 tensor-core peak,
# because JAX's default matmul precision runs float32 dots as TF32 on Ampere and later; on TPU it
# uses the bf16 peak, because the default precision there is one bfloat16 pass (JAX docs, "Matmul
# precision"). With jax_default_matmul_precision="highest" the true ceiling is far lower (H100 SXM
# non-tensor FP32: 67 TFLOP/s) and these numbers understate MFU.
# Sources: NVIDIA H100 datasheet (SXM: BF16 1979 / TF32 989 sparse; PCIe: 1513 / 756; NVL: 1671 / 835),
# NVIDIA H200 datasheet (SXM as H100 SXM; NVL 1671 / 835), NVIDIA A100 datasheet (BF16 312, TF32 156
# dense); Google Cloud TPU docs, per-chip bf16 peak: v4 275, v5e 197, v5p 459, v6e (Trillium) 918 TFLOP/s.
_BF16_AND_TF32_PEAKS = {
    "H100 SXM": (989.5e12, 494.5e12),
    "H100 PCIe": (756.5e12, 378e12),
    "H100 NVL": (835.5e12, 417.5e12),
    "H200 SXM": (989.5e12, 494.5e12),
    "H200 NVL": (835.5e12, 417.5e12),
    "A100": (312e12, 156e12),
    "TPU v4": (275e12, 275e12),
    "TPU v5e": (197e12, 197e12),
    "TPU v5p": (459e12, 459e12),
    "TPU v6e": (918e12, 918e12),
}
PEAK_FLOPS: dict[tuple[str, str], float] = {
    (chip, dtype): peak
    for chip, peaks in _BF16_AND_TF32_PEAKS.items()
    for dtype, peak in zip(("bfloat16", "float32"), peaks)
}

# jax `device.device_kind` -> chip, first match wins (so variants come before the plain name).
# Seen in the wild: "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H200", "NVIDIA GH200 480GB"
# (same GPU compute as H100 SXM), "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe", "TPU v4",
# "TPU v5 lite", "TPU v5", "TPU v5p", "TPU v6 lite".
_DEVICE_KIND_PATTERNS = (
    (r"h100.*nvl", "H100 NVL"),
    (r"h100.*pcie", "H100 PCIe"),
    (r"h100", "H100 SXM"),
    (r"h200.*nvl", "H200 NVL"),
    (r"h200", "H200 SXM"),
    (r"a100", "A100"),
    (r"tpu\s*v4(?![\s-]*lite)(?!i)\b", "TPU v4"),
    (r"tpu\s*v5[\s-]*(lite|e)\b", "TPU v5e"),
    (r"tpu\s*v5p?\b", "TPU v5p"),
    (r"tpu\s*v6[\s-]*(lite|e)\b", "TPU v6e"),
)

SUPPORTED_DTYPES = cpu_peak.SUPPORTED_DTYPES


def chip_for_device_kind(device_kind: str) -> str | None:
    """The `PEAK_FLOPS` chip name for a jax `device.device_kind` string, or None if unknown."""
    kind = device_kind.lower()
    for pattern, chip in _DEVICE_KIND_PATTERNS:
        if re.search(pattern, kind):
            return chip
    return None


def _dtype_name(dtype: Any) -> str:
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        raise FlopsError(f"peak FLOP/s: unknown dtype {dtype!r}; expected one of {', '.join(SUPPORTED_DTYPES)}") from None
    if name not in SUPPORTED_DTYPES:
        raise FlopsError(f"peak FLOP/s: dtype {name} is not supported; expected one of {', '.join(SUPPORTED_DTYPES)}")
    return name


def peak_flops_per_device(device: Any = None, dtype: Any = "float32", quick: bool = False) -> tuple[float, str]:
    """(peak dense FLOP/s of one device for matmuls in `dtype`, where the number comes from).

    Accelerators: the `PEAK_FLOPS` table ("table:<chip>"); an accelerator not in the table gives
    (nan, "unknown:<device kind>") so MFU reads nan instead of a made-up number. CPU: the best
    matmul rate of any backend on this machine ("measured-cpu-matmul", lmjax.cpu_peak), measured
    once and cached per machine; `quick` (training runs) accepts, or measures, a quick one instead of
    waiting for the full measurement (`cpu_peak.QUICK`).
    """
    peak, source, _ = peak_flops_with_record(device, dtype, quick=quick)
    return peak, source


def peak_flops_with_record(device: Any = None, dtype: Any = "float32", remeasure: bool = False,
                           quick: bool = False) -> tuple[float, str, dict]:
    """`peak_flops_per_device` plus a record of how the peak was found, its "summary" one line.
    `remeasure`: measure a CPU peak again instead of reading the cache (accelerators: no effect)."""
    device = jax.local_devices()[0] if device is None else device
    dtype_name = _dtype_name(dtype)
    if device.platform == "cpu":
        record = cpu_peak.cpu_peak_record(dtype_name, remeasure=remeasure, quick=quick)
        source = "measured-cpu-matmul-quick" if record.get("quick") else "measured-cpu-matmul"
        # Measured over every usable core: the process's CPU devices (mesh.cpu_devices) share it.
        shared_by = jax.local_device_count("cpu")
        summary = cpu_peak.describe(record) + (f"; shared by {shared_by} CPU devices" if shared_by > 1 else "")
        return record["flops_per_sec"] / shared_by, source, {**record, "cpu_devices": shared_by, "summary": summary}
    chip = chip_for_device_kind(device.device_kind)
    record = {"method": "published dense peak (lmjax.flops.PEAK_FLOPS)", "device_kind": device.device_kind, "dtype": dtype_name}
    if chip is None:
        summary = f"unknown: no published peak for {device.device_kind!r}, so MFU is nan"
        return float("nan"), f"unknown:{device.device_kind}", {**record, "chip": None, "summary": summary}
    peak = PEAK_FLOPS[(chip, dtype_name)]
    summary = f"{peak / 1e12:.1f} TFLOP/s {dtype_name}, the published dense peak of {chip}"
    return peak, f"table:{chip}", {**record, "chip": chip, "summary": summary}


def mfu(tokens_per_sec_per_device: float, flops_per_token: float, peak: float) -> float:
    """Model FLOP utilisation: achieved model FLOP/s of one device over its peak."""
    if peak <= 0:  # nan passes: an unknown peak gives an unknown MFU
        raise FlopsError(f"mfu: peak FLOP/s must be > 0, got {peak}")
    return tokens_per_sec_per_device * flops_per_token / peak
