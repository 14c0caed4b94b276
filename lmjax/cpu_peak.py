"""The CPU's peak matmul rate: MFU's denominator on CPU, measured once per machine.

A CPU has no datasheet number a framework can look up, and the rate a single library reaches
understates what the machine can do, so the peak is the best dense matmul rate that any backend
reaches: XLA:CPU with each of its matmul backends (YNNPACK fusions, XLA's default in jaxlib 0.10;
Eigen; oneDNN; XNNPACK where this jaxlib routes a dot to it), lmjax's own MKL kernel when the `mkl`
extra is installed (lmjax/models/cpu_matmul.py, what `model.matmul: auto` runs), and PyTorch's
`torch.mm` when torch is installed. Each backend runs in its own subprocess, because XLA reads XLA_FLAGS once, when its CPU
backend starts, and because the measuring process's own flags (the CLI's Eigen default, the tests'
eight fake devices) must not decide the peak. Square matrices of each size in `DEFAULT_SIZES`; after
a warm-up call, the best of `repeats` timed calls counts.

The result is cached in `CPU_PEAK_CACHE`, one entry per CPU model, usable cores, jax version and
dtype, with the record of how it was found (every backend, size and rate, date, versions, machine
load). An entry that is corrupt or of an older format is measured again. `lmjax bench
CONFIG --remeasure-peak` replaces it (do that on an idle machine: other work lowers the numbers).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from lmjax.errors import UserError

CPU_PEAK_CACHE = Path("~/.cache/lmjax/cpu_peak.json")
RECORD_VERSION = 3  # entries of another version are measured again (1 had no record, 2 no MKL kernel)
DEFAULT_SIZES = (1024, 2048, 4096)
DEFAULT_REPEATS = 5  # best of 5: a busy machine's slow calls drop out
# A training run on a machine without a cached peak does not wait the ~40 s of the full measurement:
# it measures these few backends and sizes (a few seconds) and caches that as a "quick" record, which
# `lmjax bench` (the numbers users compare) replaces by the full one.
QUICK = {"backends": ("default", "eigen"), "sizes": (1024, 2048), "repeats": 3, "include_torch": False, "include_mkl": False}
WORKER_TIMEOUT_S = 900
# Larger sizes are skipped once a call takes this long: the rate stopped growing long before, and
# bf16 on a CPU without bf16 units would otherwise spend minutes at 4096 in every backend.
SLOW_CALL_S = 3.0
_RESULT_PREFIX = "LMJAX_CPU_PEAK "  # marks the worker's result line among anything else on stdout

# backend -> (XLA_FLAGS its subprocess runs with, where XLA must compile the dot: None = anywhere).
# Found in jaxlib 0.10.2's flag list (XLA_FLAGS=--help) and checked on its optimised HLO: YNNPACK is
# the default, Eigen runs a dot that no fusion claims, oneDNN needs both of its flags, and XNNPACK's
# dot fusion is not applied to a plain dot in 0.10.2 (kept: a later jaxlib may apply it; the record
# says when it does not). A flag this jaxlib does not know aborts the worker, recorded likewise.
_NO_YNN = "--xla_cpu_experimental_ynn_fusion_type="
XLA_BACKENDS: dict[str, tuple[str, str | None]] = {
    "default": ("", None),
    "eigen": (_NO_YNN, "eigen"),
    "onednn": (f"{_NO_YNN} --xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot", "onednn"),
    "xnnpack": (f"{_NO_YNN} --xla_cpu_experimental_xnn_fusion_type=dot", "xnnpack"),
}
TORCH = "torch.mm"
MKL = "lmjax MKL"  # lmjax's MKL matmul kernel (float32)
SUPPORTED_DTYPES = ("float32", "bfloat16")


class CpuPeakError(UserError):
    """A CPU peak request that cannot be answered, reported as one line."""


# ----------------------------------------------------------------------------- the machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def cpu_has_avx512() -> bool:
    """Whether this machine's CPU has AVX-512 (Linux's /proc/cpuinfo; False where it cannot tell)."""
    try:
        return any(line.startswith("flags") and " avx512f" in line
                   for line in Path("/proc/cpuinfo").read_text().splitlines())
    except OSError:
        return False


def usable_cores() -> int:
    # XLA and torch size their thread pools by the CPUs this process may run on, not the machine's total.
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _jax_version() -> str:
    import jax  # late: the torch worker imports this module and needs no jax

    return jax.__version__


def cache_key(dtype: str) -> str:
    return f"{cpu_model()} | {usable_cores()} cores | jax {_jax_version()} | {dtype}"


# ----------------------------------------------------------------------------- measuring


def _check(dtype: str, sizes: tuple[int, ...], repeats: int) -> None:
    if dtype not in SUPPORTED_DTYPES:
        raise CpuPeakError(f"CPU peak: dtype {dtype!r} is not supported; expected one of {', '.join(SUPPORTED_DTYPES)}")
    if not sizes or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in sizes):
        raise CpuPeakError(f"CPU peak: sizes must be positive integers, got {list(sizes)}")
    if not isinstance(repeats, int) or repeats < 1:
        raise CpuPeakError(f"CPU peak: repeats must be an integer >= 1, got {repeats!r}")


def measure_backend(
    backend: str, dtype: str = "float32", sizes: tuple[int, ...] = DEFAULT_SIZES, repeats: int = DEFAULT_REPEATS,
    timeout_s: float = WORKER_TIMEOUT_S,
) -> dict[str, Any]:
    """One backend's matmul rates, measured in a fresh subprocess.

    Returns {"backend", "results": [{"size", "flops_per_sec": [one per timed call], ...}], ...};
    a backend that cannot run here has "unavailable": <why> instead of results.
    """
    sizes = tuple(sizes)
    _check(dtype, sizes, repeats)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # The worker imports this module: from the same checkout, installed or not.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")) if p)
    entry: dict[str, Any] = {"backend": backend}
    if backend == TORCH:
        env.pop("XLA_FLAGS", None)
        entry["optional"] = True  # counted when torch is installed; the peak does not depend on it
    elif backend == MKL:
        env.pop("XLA_FLAGS", None)  # a custom call: XLA's matmul flags do not reach it
        entry["optional"] = True  # counted when the mkl extra is installed
    elif backend in XLA_BACKENDS:
        env["XLA_FLAGS"] = entry["xla_flags"] = XLA_BACKENDS[backend][0]
    else:
        raise CpuPeakError(f"CPU peak: unknown backend {backend!r}; expected one of {', '.join([*XLA_BACKENDS, MKL, TORCH])}")
    expected = XLA_BACKENDS[backend][1] if backend in XLA_BACKENDS else None
    spec = {"backend": backend, "expected": expected, "dtype": dtype, "sizes": list(sizes), "repeats": repeats}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "lmjax.cpu_peak", json.dumps(spec)],
            env=env, capture_output=True, text=True, timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        return {**entry, "unavailable": f"timed out after {timeout_s:.0f} s"}
    results = [line[len(_RESULT_PREFIX):] for line in proc.stdout.splitlines() if line.startswith(_RESULT_PREFIX)]
    if proc.returncode != 0 or not results:
        lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
        why = lines[-1][:300] if lines else "no output"
        return {**entry, "unavailable": f"worker exited with {proc.returncode}: {why}"}
    return {**entry, **json.loads(results[-1])}


def _torch_installed() -> bool:
    return importlib.util.find_spec("torch") is not None  # without importing it (seconds, and memory)


def _mkl_installed() -> bool:
    try:  # the wheel holds libraries only, no module to find
        importlib.metadata.distribution("mkl")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _best_of(entry: dict[str, Any]) -> tuple[float, int | None]:
    """(best rate, its size) of one backend; (0, None) when it measured nothing."""
    rates = [(max(r["flops_per_sec"]), r["size"]) for r in entry.get("results", []) if r.get("flops_per_sec")]
    return max(rates, default=(0.0, None))


def measure(
    dtype: str = "float32", sizes: tuple[int, ...] = DEFAULT_SIZES, repeats: int = DEFAULT_REPEATS,
    backends: tuple[str, ...] | None = None, include_torch: bool = True, include_mkl: bool = True,
) -> dict[str, Any]:
    """Measure every backend (one after the other: they share the cores) and keep the best rate.

    Returns the record that is cached: "flops_per_sec" (the peak), "best" (its backend and size),
    "backends" (everything measured) and the machine and software it was measured on.
    """
    sizes = tuple(sizes)
    _check(dtype, sizes, repeats)
    # Before measuring (the measurement adds its own load): other work lowers every rate, so a load
    # above the cores says the peak is understated; `describe` shows it.
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    names = list(XLA_BACKENDS if backends is None else backends)
    entries = [measure_backend(name, dtype, sizes, repeats) for name in names]
    if include_mkl:
        if not _mkl_installed():
            entries.append({"backend": MKL, "optional": True, "unavailable": "the mkl extra is not installed"})
        else:
            entries.append(measure_backend(MKL, dtype, sizes, repeats))
    if include_torch:
        if not _torch_installed():
            entries.append({"backend": TORCH, "optional": True, "unavailable": "torch is not installed"})
        else:
            entries.append(measure_backend(TORCH, dtype, sizes, repeats))
    peak, best = 0.0, None
    for entry in entries:
        rate, size = _best_of(entry)
        if rate > peak:
            peak, best = rate, {"backend": entry["backend"], "size": size}
    if best is None:
        why = "; ".join(f"{e['backend']}: {e.get('unavailable', 'no rate')}" for e in entries)
        raise CpuPeakError(f"CPU peak: no matmul backend could be measured ({why})")
    return {
        "version": RECORD_VERSION,
        "flops_per_sec": peak,
        "best": best,
        "dtype": dtype,
        "method": f"best {dtype} square-matmul rate over backends and sizes {list(sizes)}: "
                  f"each backend in its own process, best of {repeats} timed calls after a warm-up",
        "sizes": list(sizes),
        "repeats": repeats,
        "backends": entries,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "jax_version": _jax_version(),
        "cpu_model": cpu_model(),
        "cores": usable_cores(),
        "load_average": load,
    }


# ----------------------------------------------------------------------------- the cache


def _valid(record: Any) -> bool:
    if not isinstance(record, dict) or record.get("version") != RECORD_VERSION:
        return False
    peak = record.get("flops_per_sec")
    return (isinstance(peak, (int, float)) and math.isfinite(peak) and peak > 0
            and isinstance(record.get("best"), dict) and isinstance(record.get("backends"), list))


def _read(path: Path) -> dict[str, Any]:
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # no cache yet, or a corrupt one: measured and rewritten
    return entries if isinstance(entries, dict) else {}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Runs starting together measure once: the others wait, then read the cache (measuring side
    by side would share the cores and understate the peak)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): measure unlocked
        yield
        return
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def cpu_peak_record(dtype: str = "float32", remeasure: bool = False, quick: bool = False, **measure_kwargs: Any) -> dict[str, Any]:
    """The cached record of this machine's peak for `dtype` (measured first if missing, corrupt,
    of an older format, or `remeasure`), plus "cache_file" and "from_cache" (not stored).
    `quick`: a cached quick record will do, and a missing one is measured quickly (`QUICK`);
    otherwise a quick record is replaced by the full measurement.
    `measure_kwargs` go to `measure` (sizes, repeats, backends, include_torch, include_mkl)."""
    path = CPU_PEAK_CACHE.expanduser()
    key = cache_key(dtype)

    def usable(record: Any) -> bool:
        return not remeasure and _valid(record) and (quick or not record.get("quick"))

    record = _read(path).get(key)
    if usable(record):
        return {**record, "cache_file": str(CPU_PEAK_CACHE), "from_cache": True}
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        entries = _read(path)
        if usable(entries.get(key)):  # measured by another run while this one waited
            return {**entries[key], "cache_file": str(CPU_PEAK_CACHE), "from_cache": True}
        record = {**measure(dtype, **{**QUICK, **measure_kwargs}), "quick": True} if quick else measure(dtype, **measure_kwargs)
        entries[key] = record
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # atomic replace: parallel runs never see half a file
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
        os.replace(tmp, path)
    return {**record, "cache_file": str(CPU_PEAK_CACHE), "from_cache": False}


def _label(entry: dict[str, Any], size: int | None = None) -> str:
    if entry["backend"] in (TORCH, MKL):
        return entry["backend"]
    routes = {r.get("route") for r in entry.get("results", []) if r.get("size") == size or size is None}
    route = routes.pop() if len(routes) == 1 else None
    if entry["backend"] == "default" and route:
        return f"XLA default ({route})"
    return f"XLA {entry['backend']}"


def describe(record: dict[str, Any]) -> str:
    """One line: the peak, each backend's best rate and size, when and where it was recorded."""
    parts = []
    for entry in sorted(record["backends"], key=lambda e: -_best_of(e)[0]):
        rate, size = _best_of(entry)
        parts.append(f"{_label(entry, size)} {rate / 1e9:.1f} @{size}" if size else f"{_label(entry)} unavailable")
    load = record.get("load_average")
    busy = f" at load {load[0]:.1f} on {record['cores']} cores" if load else ""
    where = f", cached in {record['cache_file']}" if record.get("cache_file") else ""
    kind = "measured quickly (`lmjax bench` measures every backend)" if record.get("quick") else "measured"
    return (f"{record['flops_per_sec'] / 1e9:.1f} GFLOP/s {record['dtype']}, {kind}: best of "
            f"{', '.join(parts)} (GFLOP/s @ matrix size; measured {record['measured_at']}{busy}{where})")


# ----------------------------------------------------------------------------- the worker (a subprocess)


def _xla_route(hlo: str) -> str:
    """Where XLA:CPU compiled the dot, read from the optimised HLO's fusion kinds."""
    for marker, route in (("__ynn_fusion", "ynnpack"), ("__onednn", "onednn"), ("__xnn_fusion", "xnnpack")):
        if marker in hlo:
            return route
    return "eigen"  # a dot no fusion claimed runs as an Eigen matmul


def _too_slow(results: list[dict[str, Any]], n: int) -> dict[str, Any] | None:
    """The skip note for size `n` when a smaller size already took over SLOW_CALL_S a call."""
    for r in results:
        if r.get("flops_per_sec") and 2.0 * r["size"] ** 3 / max(r["flops_per_sec"]) > SLOW_CALL_S:
            return {"size": n, "skipped": f"a call at size {r['size']} took over {SLOW_CALL_S:.0f} s"}
    return None


def _time(call: Any, repeats: int) -> list[float]:
    call()  # warm-up: caches, thread pools, page faults
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def _worker_xla(expected: str | None, dtype: str, sizes: list[int], repeats: int, product: Any = None,
                route_of: Any = _xla_route) -> dict[str, Any]:
    """Rates of `product` (default `jnp.dot`) compiled by XLA, each size's route read from the compiled
    program by `route_of`; sizes not compiled to `expected` (when given) are skipped."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    results: list[dict[str, Any]] = []
    for n in sizes:
        if skip := _too_slow(results, n):
            results.append(skip)
            continue
        # Operands made on the host: a jitted random generator would compile once per size.
        x = jax.device_put(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32).astype(jnp.dtype(dtype)))
        compiled = jax.jit(jnp.dot if product is None else product).lower(x, x).compile()
        route = route_of(compiled.as_text())
        if expected is not None and route != expected:
            results.append({"size": n, "route": route, "skipped": f"XLA compiled the dot to {route}, not {expected}"})
            continue
        times = _time(lambda: compiled(x, x).block_until_ready(), repeats)
        results.append({"size": n, "route": route, "flops_per_sec": [2.0 * n**3 / t for t in times]})
    if not any("flops_per_sec" in r for r in results):
        return {"unavailable": f"this jaxlib does not route a dot to {expected}", "results": results}
    return {"results": results}


def _worker_torch(dtype: str, sizes: list[int], repeats: int) -> dict[str, Any]:
    import torch

    threads = usable_cores()
    torch.set_num_threads(threads)  # torch's default may count physical cores only
    results: list[dict[str, Any]] = []
    for n in sizes:
        if skip := _too_slow(results, n):
            results.append(skip)
            continue
        a = torch.randn(n, n, generator=torch.Generator().manual_seed(0)).to(getattr(torch, dtype))
        times = _time(lambda: torch.mm(a, a), repeats)
        results.append({"size": n, "flops_per_sec": [2.0 * n**3 / t for t in times]})
    return {"results": results, "torch_version": torch.__version__, "threads": threads}


def _worker_mkl(dtype: str, sizes: list[int], repeats: int) -> dict[str, Any]:
    if dtype != "float32":
        return {"unavailable": f"the MKL kernel is float32 only, not {dtype}"}
    from lmjax.models import cpu_matmul

    if not cpu_matmul.available():
        return {"unavailable": "the MKL kernel could not be built or loaded (see the warning)"}
    return _worker_xla("mkl", dtype, sizes, repeats, product=cpu_matmul.product,
                       route_of=lambda hlo: "mkl" if cpu_matmul.calls_in(hlo) else _xla_route(hlo))


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["backend"] == MKL:
        return _worker_mkl(spec["dtype"], spec["sizes"], spec["repeats"])
    if spec["backend"] == TORCH:
        return _worker_torch(spec["dtype"], spec["sizes"], spec["repeats"])
    return _worker_xla(spec["expected"], spec["dtype"], spec["sizes"], spec["repeats"])


if __name__ == "__main__":
    print(_RESULT_PREFIX + json.dumps(_worker(json.loads(sys.argv[1]))), flush=True)
