"""FLOP/s of single fp32 matmuls of the bench_cpu model's shapes against the square peak, in XLA:CPU
or in the libraries the PyTorch peer and numpy call (best of 5 timings, 200 for the small one).

    python experiments/bench/matmul_shapes.py                      # XLA, with the CLI's flags for this CPU
    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= python experiments/bench/matmul_shapes.py   # Eigen
    python experiments/bench/matmul_shapes.py --backend torch      # the peer's (MKL / oneDNN)
    python experiments/bench/matmul_shapes.py --backend numpy      # numpy's BLAS (OpenBLAS in the wheels)
    python experiments/bench/matmul_shapes.py --backend mkl        # lmjax's MKL kernel (model.matmul: auto)
"""

import argparse
import time

from lmjax.cli import set_cpu_xla_defaults

SHAPES = {  # (M, K, N) of [M, K] x [K, N]; a 4th entry True: the left operand stored [K, M] and transposed
    "square peak": (2048, 2048, 2048),
    "square, larger": (4096, 4096, 4096),
    "q/k/v or out projection: tokens x d_model x d_model": (4096, 384, 384),
    "q, k and v as one: tokens x d_model x 3 d_model": (4096, 384, 1152),
    "MLP gate/up: tokens x d_model x d_ff": (4096, 384, 1024),
    "MLP gate and up as one: tokens x d_model x 2 d_ff": (4096, 384, 2048),
    "MLP down: tokens x d_ff x d_model": (4096, 1024, 384),
    "unembedding: tokens x d_model x vocab": (4096, 384, 8192),
    "weight gradient: d_model x tokens x d_ff": (384, 4096, 1024),
    "weight gradient as autodiff has it: x^T dy, x [tokens, d_model]": (384, 4096, 1024, True),
    "MLP down weight gradient, x^T dy": (1024, 4096, 384, True),
    "attention logits, one head: T x head_dim x T": (256, 64, 256),
}


def matmul_fn(backend: str, m: int, k: int, n: int, transposed_lhs: bool = False):
    """A no-argument function that runs one [m, k] x [k, n] product to completion (the left operand
    stored [k, m] and read transposed where `transposed_lhs`)."""
    a_shape = (k, m) if transposed_lhs else (m, k)
    lhs = (lambda a: a.T) if transposed_lhs else (lambda a: a)
    if backend == "torch":
        import torch

        a, b = torch.rand(*a_shape), torch.rand(k, n)
        return lambda: lhs(a) @ b
    if backend == "numpy":
        import numpy as np

        a, b = np.random.rand(*a_shape).astype(np.float32), np.random.rand(k, n).astype(np.float32)
        return lambda: lhs(a) @ b
    import jax
    import jax.numpy as jnp

    a, b = jnp.ones(a_shape), jnp.ones((k, n))
    if backend == "mkl":
        from lmjax.models import cpu_matmul

        if not cpu_matmul.available():
            raise SystemExit("the MKL kernel is unavailable: pip install -e '.[mkl]' (x86-64 Linux)")
        matmul = jax.jit(lambda a, b: cpu_matmul.product(a, b, trans_a=transposed_lhs))
    else:
        matmul = jax.jit(lambda a, b: jnp.dot(lhs(a), b))
    return lambda: matmul(a, b).block_until_ready()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("xla", "mkl", "torch", "numpy"), default="xla")
    args = parser.parse_args()
    if args.backend in ("xla", "mkl"):
        set_cpu_xla_defaults()  # before jax starts, as the `lmjax` command does
    for name, (m, k, n, *transposed) in SHAPES.items():
        run = matmul_fn(args.backend, m, k, n, *transposed)
        run()
        best = float("inf")
        for _ in range(5 if m * n * k > 1e8 else 200):
            t = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - t)
        print(f"{name:52s} {m}x{k}x{n}: {2 * m * k * n / best / 1e9:6.1f} GFLOP/s", flush=True)


if __name__ == "__main__":
    main()
