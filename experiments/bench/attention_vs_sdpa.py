"""One causal attention layer, forward and backward, in lmjax and in PyTorch's fused CPU attention.

    .venv/bin/python experiments/bench/attention_vs_sdpa.py [--batch 16 --seq-len 256] [--heads 6 --head-dim 64]
        [--rounds 8] [--out F.json]

The train step's attention is where lmjax's element-wise work concentrates (experiments/bench/README.md,
ninth and eleventh rounds). This times that layer alone, at the bench shapes, against what the PyTorch
peer runs: `torch.nn.functional.scaled_dot_product_attention(is_causal=True)` (its flash-attention CPU
kernel, MKL's matmuls inside). lmjax's side is `blockwise_attention` as the model calls it (packed-row
segment ids, all of one document here, so both compute the same thing): in float32 on the CPU its
native kernel (lmjax/models/attention_cpu.cc), and with `cpu_kernel=False` its XLA ops
(`model.attention=blockwise_xla`); for reference, `jax.nn.dot_product_attention` (`model.attention=xla`). Each is the vjp of the output against a fixed
cotangent: one forward, one backward.

Before timing, the outputs and the three input gradients of every JAX variant are checked against
PyTorch's on the same inputs (fp32, max abs difference below 1e-4): a faster wrong kernel would
prove nothing. Then each round times one call of every variant in turn, the order reversed every other
round (this machine's speed drifts within minutes); reported: the median per variant, and each one's
median per-round ratio to PyTorch's. XLA:CPU's flags are the CLI's (`set_cpu_xla_defaults`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from lmjax.cli import set_cpu_xla_defaults

set_cpu_xla_defaults()  # before jax starts: the matmul backend and vector width of `lmjax bench`

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lmjax.models.flash_attention import blockwise_attention  # noqa: E402

TOLERANCE = 1e-4
TORCH = "torch_sdpa"


def jax_variants() -> dict:
    """name -> attention(q, k, v, segment_ids) on [B, T, N, H]."""
    return {
        "lmjax_blockwise": lambda q, k, v, seg: blockwise_attention(q, k, v, segment_ids_BT=seg),
        "lmjax_blockwise_xla": lambda q, k, v, seg: blockwise_attention(q, k, v, segment_ids_BT=seg, cpu_kernel=False),
        "jax_dot_product_attention": lambda q, k, v, seg: jax.nn.dot_product_attention(q, k, v, is_causal=True),
    }


def inputs(batch: int, seq_len: int, heads: int, head_dim: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (batch, seq_len, heads, head_dim)
    return {name: rng.standard_normal(shape, dtype=np.float32) for name in ("q", "k", "v", "d_out")}


def jax_call(attention, x: dict[str, np.ndarray]):
    """(run, result): run() does one forward and backward to completion; result() is (out, dq, dk, dv)."""
    @jax.jit
    def fwd_bwd(q, k, v, seg, d_out):
        out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, seg), q, k, v)
        return (out, *vjp(d_out))

    args = [jnp.asarray(x[n]) for n in ("q", "k", "v")] + [jnp.zeros(x["q"].shape[:2], jnp.int32), jnp.asarray(x["d_out"])]
    run = lambda: jax.block_until_ready(fwd_bwd(*args))  # noqa: E731
    return run, lambda: [np.asarray(a) for a in run()]


def torch_call(x: dict[str, np.ndarray]):
    # SDPA takes [B, N, T, H]; the gradients come back in that layout and are turned back for the check.
    q, k, v = (torch.tensor(x[n]).transpose(1, 2).contiguous().requires_grad_() for n in ("q", "k", "v"))
    d_out = torch.tensor(x["d_out"]).transpose(1, 2).contiguous()

    def run():
        for t in (q, k, v):
            t.grad = None
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.backward(d_out)
        return out

    def result():
        out = run()
        return [t.detach().transpose(1, 2).numpy() for t in (out, q.grad, k.grad, v.grad)]

    return run, result


def check_against_torch(results: dict[str, list[np.ndarray]]) -> dict[str, float]:
    """Max abs difference of (out, dq, dk, dv) of each JAX variant from PyTorch's; raises above TOLERANCE."""
    reference = results[TORCH]
    errors = {}
    for name, arrays in results.items():
        if name == TORCH:
            continue
        errors[name] = max(float(np.abs(a - b).max()) for a, b in zip(arrays, reference))
        if errors[name] > TOLERANCE:
            raise SystemExit(f"attention_vs_sdpa: {name} differs from PyTorch's SDPA by {errors[name]:.2e} "
                             f"(max abs over output and gradients), expected below {TOLERANCE:g}")
    return errors


def time_in_turn(runs: dict, rounds: int) -> dict[str, list[float]]:
    names, times = list(runs), {name: [] for name in runs}
    for name in names:  # warm-up: compile, and one more call
        runs[name]()
        runs[name]()
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    if min(a.batch, a.seq_len, a.heads, a.head_dim, a.rounds) < 1:
        p.error("--batch, --seq-len, --heads, --head-dim and --rounds must be >= 1")

    x = inputs(a.batch, a.seq_len, a.heads, a.head_dim)
    calls = {name: jax_call(f, x) for name, f in jax_variants().items()}
    calls[TORCH] = torch_call(x)
    errors = check_against_torch({name: result() for name, (_, result) in calls.items()})
    times = time_in_turn({name: run for name, (run, _) in calls.items()}, a.rounds)

    shape = f"B={a.batch} T={a.seq_len} N={a.heads} H={a.head_dim}"
    report = {"shape": {"batch": a.batch, "seq_len": a.seq_len, "heads": a.heads, "head_dim": a.head_dim},
              "rounds": a.rounds, "max_abs_difference_from_torch": errors, "torch_threads": torch.get_num_threads(),
              "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "variants": {}}
    for name, ts in times.items():
        ratio = statistics.median(t / u for t, u in zip(ts, times[TORCH]))
        report["variants"][name] = {"median_ms": 1e3 * statistics.median(ts), "ratio_to_torch": ratio,
                                    "times_ms": [1e3 * t for t in ts]}
        note = f" | max abs diff from torch {errors[name]:.1e}" if name in errors else ""
        print(f"{shape} {name:26s} {1e3 * statistics.median(ts):8.1f} ms | {ratio:.2f}x torch's time{note}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
