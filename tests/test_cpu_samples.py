"""experiments/bench/cpu_samples.py: perf's symbol map written from XLA's JIT registrations names
the fusions of a compiled program at the addresses their code runs from, and samples are grouped
by the library and symbol they fall in."""

import importlib.util
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_cpu_samples", ROOT / "experiments" / "bench" / "cpu_samples.py")
cpu_samples = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cpu_samples)


def test_perf_map_names_the_fusions_of_a_compiled_program():
    compiled = jax.jit(lambda x, y: jnp.tanh(x) * y + 3.0).lower(jnp.ones((64, 64)), jnp.ones((64, 64))).compile()
    fusions = set(re.findall(r"^\s*(?:ROOT )?%(\S+) = \S+ fusion\(", compiled.as_text(), re.M))
    assert fusions  # the element-wise chain is one loop fusion
    path = Path(f"/tmp/perf-{os.getpid()}.map")
    try:
        assert cpu_samples.write_perf_map() > 0
        entries = {}
        for line in path.read_text().splitlines():
            address, size, name = line.split(" ", 2)
            entries[name] = (int(address, 16), int(size, 16))
    finally:
        path.unlink(missing_ok=True)
    assert fusions & set(entries), (fusions, sorted(entries)[:20])
    # The addresses are where the code is: inside an executable mapping of this process (from the
    # kernel's own list), whole functions; and writing the map leaves the program working.
    executable = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, perms = line.split()[:2]
        if "x" in perms:
            executable.append(tuple(int(x, 16) for x in span.split("-")))
    for name in fusions & set(entries):
        address, size = entries[name]
        assert size > 0 and any(lo <= address and address + size <= hi for lo, hi in executable), name
    np.testing.assert_allclose(compiled(jnp.ones((64, 64)), jnp.ones((64, 64))), np.tanh(1.0) + 3.0, rtol=1e-6)


def test_samples_are_grouped_by_library_and_symbol():
    cases = {
        ("libjax_common.so", "ynn::dot_fp32_5x64x1_1x16x1_avx512"): "matmul: YNNPACK",
        ("libjax_common.so", "Eigen::internal::gemm_pack_colmajor_block<float, long>"): "matmul: Eigen + oneDNN sgemm",
        ("[JIT] tid 42", "0x00007f07b021582f"): "matmul: Eigen + oneDNN sgemm",  # JIT code XLA did not register
        ("[JIT] tid 42", "multiply_bitcast_fusion.7"): "element-wise: compiled (XLA fusions, Inductor kernels)",
        ("cxk7xod6.main.so", "kernel"): "element-wise: compiled (XLA fusions, Inductor kernels)",
        ("libjax_common.so", "ynn::multiply_fp32_x86_avx512f_avx512bw"): "element-wise: libraries (YNNPACK, SLEEF, fused AdamW)",
        ("libtorch_cpu.so", "Sleef_finz_expf16_u10avx512f"): "element-wise: libraries (YNNPACK, SLEEF, fused AdamW)",
        ("libtorch_cpu.so", "mkl_blas_avx512_sgemm_kernel_0"): "matmul: MKL",
        ("libtorch_cpu.so", "at::native::cpu_flash_attention<float, float, 64l, 512l, false>"): "attention: PyTorch's fused kernel",
        ("[kernel.kallsyms]", "clear_page_erms"): "OS kernel",
        ("libc.so.6", "__memmove_avx512_unaligned_erms"): "C library",
        ("libpython3.11.so.1.0", "0x000000000001e02a"): cpu_samples.OTHER,  # unresolved, but not JIT code
    }
    for (dso, symbol), expected in cases.items():
        assert cpu_samples.categorize(dso, symbol) == expected, (dso, symbol)
