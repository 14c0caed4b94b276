"""The CPU matmul peak (lmjax.cpu_peak): the best backend wins, the cache keeps how it was found
and is reused, a bad entry is measured again, and a real worker subprocess measures one backend.
Real measurements here use 256 x 256 and one timing: seconds, never the 4096 default."""

import json
import platform
import sys

import pytest

from lmjax import cpu_peak
from lmjax.cli import build_parser

RATES = {"default": 9e10, "eigen": 1.2e11, "onednn": 1.1e11, cpu_peak.MKL: 1.4e11, cpu_peak.TORCH: 1.5e11}


@pytest.fixture
def fake_backends(tmp_path, monkeypatch):
    """Backends that report RATES (at size 256; half of it at 128) without a subprocess; xnnpack
    is unavailable. Returns the list of (backend, dtype) measured, in order."""
    monkeypatch.setattr(cpu_peak, "CPU_PEAK_CACHE", tmp_path / "cache" / "cpu_peak.json")
    monkeypatch.setattr(cpu_peak, "_torch_installed", lambda: True)
    monkeypatch.setattr(cpu_peak, "_mkl_installed", lambda: True)
    calls = []

    def measure_backend(name, dtype, sizes, repeats):
        calls.append((name, dtype))
        if name not in RATES:
            return {"backend": name, "unavailable": "this jaxlib does not route a dot to xnnpack"}
        route = {"default": "ynnpack", "onednn": "onednn"}.get(name, "eigen")
        results = [{"size": n, "route": route, "flops_per_sec": [RATES[name] * n / 256 * f for f in (0.9, 1.0)]} for n in sizes]
        return {"backend": name, "results": results}

    monkeypatch.setattr(cpu_peak, "measure_backend", measure_backend)
    return calls


def test_best_rate_of_any_backend_and_size_is_the_peak(fake_backends):
    record = cpu_peak.measure("float32", sizes=(128, 256), repeats=2)
    assert record["flops_per_sec"] == 1.5e11 and record["best"] == {"backend": "torch.mm", "size": 256}
    assert [e["backend"] for e in record["backends"]] == [*cpu_peak.XLA_BACKENDS, "lmjax MKL", "torch.mm"]
    assert record["sizes"] == [128, 256] and record["repeats"] == 2 and record["version"] == cpu_peak.RECORD_VERSION
    line = cpu_peak.describe(record)
    assert line.startswith("150.0 GFLOP/s float32, measured: best of torch.mm 150.0 @256, lmjax MKL 140.0 @256, XLA eigen 120.0 @256, ")
    assert "XLA default (ynnpack) 90.0 @256" in line and "XLA xnnpack unavailable" in line
    assert f" at load {record['load_average'][0]:.1f} on {record['cores']} cores" in line  # a busy machine's peak is low


def test_without_torch_or_mkl_the_record_says_so(fake_backends, monkeypatch):
    monkeypatch.setattr(cpu_peak, "_torch_installed", lambda: False)
    monkeypatch.setattr(cpu_peak, "_mkl_installed", lambda: False)
    record = cpu_peak.measure("float32", sizes=(256,), repeats=1)
    assert record["best"] == {"backend": "eigen", "size": 256}
    assert record["backends"][-2:] == [{"backend": "lmjax MKL", "optional": True, "unavailable": "the mkl extra is not installed"},
                                       {"backend": "torch.mm", "optional": True, "unavailable": "torch is not installed"}]


def test_no_measurable_backend_is_one_line_error(fake_backends, monkeypatch):
    monkeypatch.setattr(cpu_peak, "_torch_installed", lambda: False)
    monkeypatch.setattr(cpu_peak, "_mkl_installed", lambda: False)
    with pytest.raises(cpu_peak.CpuPeakError, match=r"^CPU peak: no matmul backend could be measured \(xnnpack: .*\)$"):
        cpu_peak.measure("float32", sizes=(256,), repeats=1, backends=("xnnpack",))
    with pytest.raises(cpu_peak.CpuPeakError, match="repeats must be an integer >= 1"):
        cpu_peak.measure("float32", sizes=(256,), repeats=0)
    with pytest.raises(cpu_peak.CpuPeakError, match="dtype 'float16' is not supported"):
        cpu_peak.measure("float16", sizes=(256,), repeats=1)


def test_unknown_backend_is_one_line_error():
    with pytest.raises(cpu_peak.CpuPeakError, match="unknown backend 'mkl'; expected one of default, eigen, "):
        cpu_peak.measure_backend("mkl", "float32", sizes=(256,), repeats=1)


def test_cache_records_the_method_and_is_reused(fake_backends):
    first = cpu_peak.cpu_peak_record("float32", sizes=(256,), repeats=1)
    assert not first["from_cache"] and first["flops_per_sec"] == 1.5e11
    measured = len(fake_backends)
    again = cpu_peak.cpu_peak_record("float32")  # default sizes: would measure 4096 if it did not reuse
    assert again["from_cache"] and len(fake_backends) == measured
    assert {k: v for k, v in again.items() if k != "from_cache"} == {k: v for k, v in first.items() if k != "from_cache"}
    cpu_peak.cpu_peak_record("bfloat16", sizes=(256,), repeats=1)  # another dtype is another entry
    assert fake_backends[-1] == ("torch.mm", "bfloat16")
    entries = json.loads(cpu_peak.CPU_PEAK_CACHE.read_text())
    assert sorted(key.rsplit(" | ", 1)[1] for key in entries) == ["bfloat16", "float32"]
    stored = entries[cpu_peak.cache_key("float32")]
    for field in ("method", "best", "backends", "measured_at", "jax_version", "cpu_model", "cores", "load_average"):
        assert field in stored
    assert "cache_file" not in stored and "from_cache" not in stored
    assert not list(cpu_peak.CPU_PEAK_CACHE.parent.glob("*.tmp"))  # written by an atomic replace
    cpu_peak.cpu_peak_record("float32", remeasure=True, sizes=(256,), repeats=1)
    backends = len(cpu_peak.XLA_BACKENDS) + 2  # and the MKL kernel and torch.mm
    assert len(fake_backends) == measured + 2 * backends  # bfloat16, then the remeasure


@pytest.mark.parametrize(
    "bad_entry",
    ["not json", json.dumps([1, 2]), "old-format", "negative"],
)
def test_corrupt_or_old_cache_entry_is_measured_again(fake_backends, bad_entry):
    path = cpu_peak.CPU_PEAK_CACHE
    path.parent.mkdir(parents=True)
    key = cpu_peak.cache_key("float32")
    if bad_entry == "old-format":  # what lmjax wrote before the record: a rate, no method
        bad_entry = json.dumps({key: {"flops_per_sec": 1.9e11, "measured_at": "2026-12-04T09:39:15"}})
    elif bad_entry == "negative":
        bad_entry = json.dumps({key: {"version": cpu_peak.RECORD_VERSION, "flops_per_sec": -1.0, "best": {}, "backends": []}})
    path.write_text(bad_entry)
    record = cpu_peak.cpu_peak_record("float32", sizes=(256,), repeats=1)
    assert not record["from_cache"] and record["flops_per_sec"] == 1.5e11 and fake_backends
    assert json.loads(path.read_text())[key]["flops_per_sec"] == 1.5e11


def test_worker_subprocess_measures_one_xla_backend():
    entry = cpu_peak.measure_backend("eigen", "float32", sizes=(256,), repeats=1)
    assert entry["backend"] == "eigen" and entry["xla_flags"] == "--xla_cpu_experimental_ynn_fusion_type="
    (result,) = entry["results"]
    assert result["size"] == 256 and result["route"] == "eigen"  # read from the compiled HLO
    assert len(result["flops_per_sec"]) == 1 and result["flops_per_sec"][0] > 0


def test_worker_subprocess_measures_the_mkl_kernel():
    if not (sys.platform == "linux" and platform.machine() == "x86_64"):
        pytest.skip("the mkl extra (in test) installs on x86-64 Linux only")
    entry = cpu_peak.measure_backend(cpu_peak.MKL, "float32", sizes=(128,), repeats=1)
    assert entry["backend"] == "lmjax MKL" and entry["optional"] and "xla_flags" not in entry
    assert entry["results"][0]["size"] == 128 and entry["results"][0]["flops_per_sec"][0] > 0
    assert entry["results"][0]["route"] == "mkl"  # the compiled program called the kernel
    assert "float32 only" in cpu_peak.measure_backend(cpu_peak.MKL, "bfloat16", sizes=(128,), repeats=1)["unavailable"]


def test_worker_subprocess_measures_torch():
    pytest.importorskip("torch")
    entry = cpu_peak.measure_backend(cpu_peak.TORCH, "float32", sizes=(128,), repeats=1)
    assert entry["backend"] == "torch.mm" and entry["optional"] and entry["threads"] == cpu_peak.usable_cores()
    assert entry["results"][0]["size"] == 128 and entry["results"][0]["flops_per_sec"][0] > 0


def test_a_flag_this_jaxlib_lacks_makes_its_backend_unavailable(monkeypatch):
    monkeypatch.setitem(cpu_peak.XLA_BACKENDS, "mkl", ("--xla_cpu_use_no_such_library=true", None))
    entry = cpu_peak.measure_backend("mkl", "float32", sizes=(64,), repeats=1)
    assert "results" not in entry and "Unknown flag in XLA_FLAGS" in entry["unavailable"]


def test_bench_has_a_remeasure_flag():
    args = build_parser().parse_args(["bench", "configs/dense_tiny.yaml", "--remeasure-peak", "--steps", "3"])
    assert args.remeasure_peak and args.steps == 3
    assert not build_parser().parse_args(["bench", "configs/dense_tiny.yaml"]).remeasure_peak


def test_sizes_after_a_slow_call_are_skipped():
    fast = {"size": 1024, "flops_per_sec": [1e11]}  # 0.02 s a call
    slow = {"size": 2048, "flops_per_sec": [2e9, 4e9]}  # over 4 s a call, even the best
    assert cpu_peak._too_slow([fast], 2048) is None
    assert cpu_peak._too_slow([fast, slow], 4096) == {"size": 4096, "skipped": "a call at size 2048 took over 3 s"}


def test_training_runs_take_a_quick_peak_that_bench_replaces(fake_backends):
    quick = cpu_peak.cpu_peak_record("float32", quick=True)  # a training run on a machine without a peak
    assert quick["quick"] and not quick["from_cache"]
    assert [name for name, _ in fake_backends] == list(cpu_peak.QUICK["backends"])  # no torch, not every backend
    assert quick["sizes"] == list(cpu_peak.QUICK["sizes"]) and quick["flops_per_sec"] == RATES["eigen"] * 2048 / 256
    assert "measured quickly" in cpu_peak.describe(quick)
    assert cpu_peak.cpu_peak_record("float32", quick=True)["from_cache"]  # the next run reuses it
    measured = len(fake_backends)
    full = cpu_peak.cpu_peak_record("float32", sizes=(256,), repeats=1)  # bench: the quick record does not do
    assert not full["from_cache"] and not full.get("quick") and len(fake_backends) == measured + len(cpu_peak.XLA_BACKENDS) + 2
    again = cpu_peak.cpu_peak_record("float32", quick=True)  # and training runs then read the full one
    assert again["from_cache"] and not again.get("quick") and again["flops_per_sec"] == full["flops_per_sec"]
