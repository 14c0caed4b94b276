"""`lmjax bench`: steady-state speed of the real train step on the real input pipeline.

Compiles the same jitted step `lmjax train` runs (ahead of time, so compile time is measured
on its own), runs `warmup` untimed steps, then times `steps` steps one by one (each blocked until
done). Reports median step time and spread, tokens/s, model TFLOP/s (FLOPs from lmjax.flops),
MFU against the device peak (the published dense peak, or on CPU the best matmul rate of any
backend, lmjax.cpu_peak: which one, and how it was found, is printed and recorded), peak memory
(device stats where the backend has them, else host RSS), compile time and time to first step.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

import lmjax
from lmjax import flops, host_memory, sharding
from lmjax.config import Config, to_dict
from lmjax.errors import UserError
from lmjax.models import cpu_matmul
from lmjax.train.step import ModelSetup, compile_train_step


def _peak_memory() -> tuple[int, str]:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "host max RSS"


def prepare(cfg: Config, n_batches: int) -> tuple[ModelSetup, Any, list[dict[str, jax.Array]]]:
    """The model setup, the train input pipeline and its first `n_batches` global batches, which
    `bench` cycles through (experiments/bench/profile_step.py builds its step from here too)."""
    setup = ModelSetup.build(cfg)
    data = setup.task.build_data(cfg)
    train_iter = data.train_iterator(jax.process_index(), jax.process_count())
    batches = [setup.global_batch(next(train_iter)) for _ in range(n_batches)]
    return setup, train_iter, batches


def compile_step(setup: ModelSetup, seed: int, batch: dict[str, jax.Array]) -> tuple[Any, Any, float]:
    """Inside `sharding.activate`: the initial train state, the train step compiled ahead of time
    for `batch`'s shapes as `lmjax train` compiles it (`compile_train_step`), and the compile seconds."""
    state = setup.factory.create(seed)
    t0 = time.perf_counter()
    compiled = compile_train_step(setup.train_step(), state, batch)
    return state, compiled, time.perf_counter() - t0


def run_bench(
    cfg: Config, steps: int = 10, warmup: int = 2, out: str | None = None, remeasure_peak: bool = False
) -> dict[str, Any]:
    if steps < 1 or warmup < 0:
        raise UserError(f"bench: expected --steps >= 1 and --warmup >= 0, got {steps} and {warmup}")
    process_start = time.perf_counter()
    # Compile time is measured cold: a hit in the persistent cache would time a file read.
    jax.config.update("jax_enable_compilation_cache", False)
    setup, train_iter, batches = prepare(cfg, min(4, steps + warmup))
    mesh = setup.mesh

    with sharding.activate(mesh, setup.rules):
        state, compiled, compile_time = compile_step(setup, cfg.seed, batches[0])
        # Which matmuls the step runs; the kernel is CPU-only, so no other backend's program is printed.
        on_cpu = jax.default_backend() == "cpu"
        matmul = "mkl" if on_cpu and cpu_matmul.calls_in(compiled.as_text()) else "xla"
        state, metrics = compiled(state, batches[0])
        jax.block_until_ready(metrics)
        time_to_first_step = time.perf_counter() - process_start
        for i in range(warmup):
            state, metrics = compiled(state, batches[(i + 1) % len(batches)])
        jax.block_until_ready(metrics)
        times = []
        for i in range(steps):
            t = time.perf_counter()
            state, metrics = compiled(state, batches[i % len(batches)])
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t)

    # The input pipeline alone (host side, prefetch threads included): how many batches per
    # second it can hand over, against how many the step consumes.
    n_data = 50
    t = time.perf_counter()
    for _ in range(n_data):
        next(train_iter)
    data_batches_per_sec = n_data / (time.perf_counter() - t)
    train_iter.close()

    tokens_per_step = cfg.data.global_batch_size * setup.task.tokens_per_row()
    step_time = statistics.median(times)
    # matmul FLOPs, no embedding gather
    flops_per_token = flops.model_flops_per_token(cfg.model, cfg.data.seq_len, setup.task.decoder_len(), setup.task.forward_passes())
    # After the timed steps, so a CPU peak measurement (subprocesses on every core) cannot slow them.
    peak, peak_source, peak_record = flops.peak_flops_with_record(jax.devices()[0], cfg.model.dtype, remeasure=remeasure_peak)
    tokens_per_sec = tokens_per_step / step_time
    memory, memory_source = _peak_memory()
    counts = flops.param_counts(cfg.model)
    result = {
        "tokens_per_sec": tokens_per_sec,
        "mfu": flops.mfu(tokens_per_sec / jax.device_count(), flops_per_token, peak),
        "step_time_s": step_time,
        "step_time_p10_s": float(np.percentile(times, 10)),
        "step_time_p90_s": float(np.percentile(times, 90)),
        "tflops_per_sec": tokens_per_sec * flops_per_token / 1e12,
        "compile_time_s": compile_time,
        "time_to_first_step_s": time_to_first_step,
        "peak_memory_bytes": memory,
        "peak_memory_source": memory_source,
        "peak_flops_per_device": peak,
        "peak_flops_source": peak_source,
        "peak_flops_record": peak_record,
        "model_flops_per_token": flops_per_token,
        "params_total": counts["total"],
        "params_non_embedding": counts["non_embedding"],
        "tokens_per_step": tokens_per_step,
        "data_batches_per_sec": data_batches_per_sec,
        "data_headroom": data_batches_per_sec * step_time,  # > 1: the pipeline outpaces the step
        "timed_steps": steps,
        "final_loss": float(metrics["loss"]),
        "model_family": cfg.model.family,
        "objective": setup.task.name,
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "matmul": matmul,
        "malloc": host_memory.allocator(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "mesh": dict(mesh.shape),
        "jax_version": jax.__version__,
        "lmjax_version": lmjax.__version__,
        "config": to_dict(cfg),
    }
    print(
        f"{result['device']} | step {step_time * 1e3:.1f} ms (p10 {result['step_time_p10_s'] * 1e3:.1f}, "
        f"p90 {result['step_time_p90_s'] * 1e3:.1f}) | {tokens_per_sec:,.0f} tokens/s | "
        f"{result['tflops_per_sec']:.3f} TFLOP/s | matmuls {matmul.upper()} | malloc {result['malloc'].split()[0]} | MFU {result['mfu']:.1%} of {peak / 1e12:.2f} TFLOP/s ({peak_source}) | "
        f"compile {compile_time:.1f}s | first step after {time_to_first_step:.1f}s | "
        f"peak memory {memory / 2**20:,.0f} MiB ({memory_source}) | "
        f"input pipeline {data_batches_per_sec:,.0f} batches/s = {result['data_headroom']:,.0f}x the step rate"
    )
    print(f"peak {peak_record['summary']}")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result
