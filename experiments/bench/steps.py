"""The train steps the bench tools time, built as `lmjax bench` and the PyTorch peer build them.

`lmjax_step` is `lmjax bench`'s step: the CLI's XLA defaults and huge-page malloc, the step compiled
ahead of time as `lmjax train` compiles it, batches from the real input pipeline. `peer_step` is
`torch_reference.py`'s compiled step for the same resolved config. cpu_samples.py and ab_steps.py run
them in child processes; each returns `run_step(i)`, which runs step i to completion (batches cycle).
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable


def lmjax_step(config: str, overrides: list[str], script: str, n_batches: int = 4) -> tuple[Callable[[int], None], Callable[[], None]]:
    """(run_step, close). `script` is the calling child's path: the huge-page restart re-executes it
    with the same arguments, so call this before anything imports jax."""
    from lmjax.cli import dispatch_inline_under_jemalloc, restart_with_tuned_malloc, set_cpu_xla_defaults

    restart_with_tuned_malloc(sys.argv[1:], program=[os.path.abspath(script)])
    set_cpu_xla_defaults()
    dispatch_inline_under_jemalloc()
    import jax

    from lmjax import sharding
    from lmjax.bench import compile_step, prepare
    from lmjax.config import load_config

    cfg = load_config(config, overrides)
    jax.config.update("jax_enable_compilation_cache", False)  # as bench: the compile is part of what it reports
    setup, train_iter, batches = prepare(cfg, n_batches)
    context = contextlib.ExitStack()
    context.enter_context(sharding.activate(setup.mesh, setup.rules))
    state, compiled, _ = compile_step(setup, cfg.seed, batches[0])
    holder = {"state": state}

    def run_step(i: int) -> None:
        holder["state"], metrics = compiled(holder["state"], batches[i % len(batches)])
        jax.block_until_ready(metrics)

    def close() -> None:
        context.close()
        train_iter.close()

    return run_step, close


def peer_step(config: str, overrides: list[str]) -> Callable[[int], None]:
    """run_step of the PyTorch peer for the same resolved lmjax config (its first call compiles)."""
    import torch_reference
    from peer import peer_cli_args

    from lmjax.config import load_config

    _, step, _, batches, _ = torch_reference.build(torch_reference.parse_args(peer_cli_args(load_config(config, overrides))))
    return lambda i: step(*batches[i % len(batches)], i)
