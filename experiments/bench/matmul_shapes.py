"""FLOP/s of single fp32 matmuls of the bench_cpu model's shapes against the square peak.

    python experiments/bench/matmul_shapes.py
    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= python experiments/bench/matmul_shapes.py   # Eigen, as the CLI
"""

import time

import jax
import jax.numpy as jnp

SHAPES = {  # (M, K, N) of [M, K] x [K, N]
    "square peak": (2048, 2048, 2048),
    "MLP gate/up: tokens x d_model x d_ff": (4096, 384, 1024),
    "MLP down: tokens x d_ff x d_model": (4096, 1024, 384),
    "unembedding: tokens x d_model x vocab": (4096, 384, 8192),
    "weight gradient: d_model x tokens x d_ff": (384, 4096, 1024),
    "attention logits, one head: T x head_dim x T": (256, 64, 256),
}
for name, (m, k, n) in SHAPES.items():
    a, b = jnp.ones((m, k)), jnp.ones((k, n))
    matmul = jax.jit(jnp.dot)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(5 if m * n * k > 1e8 else 200):
        t = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    print(f"{name:45s} {m}x{k}x{n}: {2 * m * k * n / best / 1e9:6.1f} GFLOP/s")
