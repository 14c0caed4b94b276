"""Where a train step's CPU time goes, by code that ran it: `perf` samples of lmjax's step and of its
PyTorch peer's, split into matmul kernels, compiled element-wise code, the kernel and the rest.

    .venv/bin/python experiments/bench/cpu_samples.py [--side lmjax|peer|both] [--config C] [--style S]
        [--seq-len L --batch B] [--steps 10] [--out F.json]

`profile_step.py` times XLA's thunks; that misses work a thunk hands to the thread pool (a matmul's
tiles, an element-wise fusion's partitions), so it cannot say how much CPU each kind of code takes,
nor compare with the peer. This samples the whole process with `perf record` (Linux perf, at 999 Hz
on every thread) during the timed steps only: the step is built, compiled and warmed up as
`lmjax bench` / `torch_reference.py` do, in a child process that perf runs with recording off, and
the child switches recording on and off around its timed steps (perf's --control fifos). Each side's
samples are grouped by the symbol and library they fall in, then turned into CPU seconds per step
with the child's own CPU time (os.times) over those steps:

- matmul, by library: YNNPACK's dot and packing routines; Eigen's contractions (their packing, and
  the oneDNN sgemm kernels they run, JIT-compiled: the JIT code XLA did not register, see below);
  MKL's sgemm and its copies (the peer);
- attention: PyTorch's fused scaled_dot_product_attention (the peer; lmjax's blockwise attention is
  matmuls plus element-wise code);
- element-wise code: what the compiler emitted (XLA's JIT-compiled fusions, Inductor's C++ kernels),
  and libraries (YNNPACK's element-wise/reduction/transpose kernels, SLEEF's vector math, fused AdamW);
- OS kernel (page faults, scheduling, syscalls); C library (memcpy, malloc); everything else
  (thread pools waiting, the Python interpreter, dispatch).

XLA:CPU registers the code it JIT-compiles with debuggers (LLVM's GDB JIT interface), not with perf,
so before recording the lmjax child walks that list (`__jit_debug_descriptor` in jaxlib) and writes
perf's symbol map, /tmp/perf-PID.map: XLA's fusions are then named by their HLO names in the
`top_symbols`. JIT code that is not on the list is oneDNN's (Xbyak) sgemm, which Eigen's
contractions call for the dots XLA does not hand to YNNPACK (the weight gradients, whose left
operand is contracted over its major dimension); checked by disassembling the hottest such address
(an AVX-512 broadcast-FMA microkernel, 24 zmm accumulators).

Both sides take the step shape from the same resolved lmjax config (peer.py's `peer_cli_args`).
Needs `perf` on the PATH and a kernel that lets this user sample (perf_event_paranoid <= 2 for
one's own processes).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CATEGORIES = (  # the first whose patterns all match (None: any) wins: (name, library pattern, symbol pattern)
    ("matmul: YNNPACK", None, r"^ynn::(dot|pack)|ynn::run_dot"),
    ("matmul: Eigen + oneDNN sgemm", None, r"gemm_pack|TensorContraction|Eigen::internal::gebp|dnnl"),
    ("matmul: Eigen + oneDNN sgemm", r"^\[JIT\]", r"^0x[0-9a-f]+$"),  # JIT code XLA did not register
    ("matmul: MKL", None, r"mkl_blas|gblock_by_k|sgemm"),
    ("attention: PyTorch's fused kernel", None, r"flash_attention"),
    ("element-wise: compiled (XLA fusions, Inductor kernels)", r"^\[JIT\]|\.main\.so$", None),
    ("element-wise: compiled (XLA fusions, Inductor kernels)", None, r"kernel\._omp_fn"),
    ("element-wise: libraries (YNNPACK, SLEEF, fused AdamW)", None, r"^Sleef_|adam|^ynn::"),
    ("OS kernel", r"kernel\.kallsyms", None),
    ("C library", r"^libc\.so", None),
)
OTHER = "other (thread pools, interpreter, dispatch)"


def categorize(dso: str, symbol: str) -> str:
    for name, dso_pattern, symbol_pattern in CATEGORIES:
        if (dso_pattern is None or re.search(dso_pattern, dso)) and (symbol_pattern is None or re.search(symbol_pattern, symbol)):
            return name
    return OTHER


class PerfControl:
    """The child's end of perf's --control fifos: `enable` / `disable` wait for perf's ack."""

    def __init__(self) -> None:
        self.ctl = open(os.environ["LMJAX_PERF_CTL"], "w")
        self.ack = open(os.environ["LMJAX_PERF_ACK"])

    def send(self, command: str) -> None:
        self.ctl.write(command + "\n")
        self.ctl.flush()
        self.ack.readline()


def elf_functions(elf, wanted: str | None = None):
    """(name, load address of its section, value, size) of an ELF64 image's function symbols, or of the
    symbol named `wanted` whatever its kind. JIT-registered objects carry their sections' load
    addresses; a shared library's are relative to where it is mapped."""
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", elf, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    for table in (s for s in sections if s[1] == 2):  # SHT_SYMTAB: (name, type, flags, addr, offset, size, link, ...)
        strings = sections[table[6]][4]
        for offset in range(table[4], table[4] + table[5], 24):
            name_at, info, _, index, value, size = struct.unpack_from("<IBBHQQ", elf, offset)
            name = elf[strings + name_at:elf.find(b"\0", strings + name_at)].decode(errors="replace")
            if name == wanted or (wanted is None and info & 0xF == 2 and size and 0 < index < shnum):  # STT_FUNC
                yield name, sections[index][3] if index < shnum else 0, value, size


def write_perf_map() -> int:
    """Writes /tmp/perf-PID.map from the GDB JIT interface's list of in-memory object files (the code
    XLA:CPU compiled so far in this process); returns the number of functions, 0 where jaxlib's
    library or its `__jit_debug_descriptor` is not found."""
    mapped = [line.split() for line in Path("/proc/self/maps").read_text().splitlines()]
    library = next((m for m in mapped if len(m) == 6 and m[5].endswith("/libjax_common.so") and m[2] == "00000000"), None)
    if library is None:
        return 0
    base = int(library[0].split("-")[0], 16)
    with open(library[5], "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as image:
        descriptor = next(elf_functions(image, "__jit_debug_descriptor"), None)
    if descriptor is None:
        return 0
    read = lambda address: ctypes.c_uint64.from_address(address).value  # noqa: E731
    entry, lines = read(base + descriptor[2] + 16), []  # jit_descriptor {u32 version, u32 flag, *relevant, *first}
    while entry:  # jit_code_entry {*next, *prev, const char *symfile, u64 size}
        elf = ctypes.string_at(read(entry + 16), read(entry + 24))
        lines += [f"{address + value:x} {size:x} {name}" for name, address, value, size in elf_functions(elf)]
        entry = read(entry)
    Path(f"/tmp/perf-{os.getpid()}.map").write_text("\n".join(lines) + "\n")
    return len(lines)


def timed_steps(run_step, steps: int, out: Path) -> None:
    """Runs `steps` steps with perf recording and writes their wall and CPU time per step to `out`."""
    control = PerfControl()
    control.send("enable")
    wall0, cpu0 = time.perf_counter(), os.times()
    for i in range(steps):
        run_step(i)
    wall1, cpu1 = time.perf_counter(), os.times()
    control.send("disable")
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    perf_map = Path(f"/tmp/perf-{os.getpid()}.map")
    out.write_text(json.dumps({"step_time_s": (wall1 - wall0) / steps, "cpu_s_per_step": cpu / steps,
                               "perf_map": str(perf_map) if perf_map.exists() else None}))


def child_lmjax(config: str, overrides: list[str], steps: int, out: Path) -> None:
    from steps import lmjax_step  # beside this file, as peer.py

    run_step, close = lmjax_step(config, overrides, __file__)
    for i in range(2):
        run_step(i)
    print(f"perf map: {write_perf_map()} JIT-compiled functions of XLA named", file=sys.stderr)
    timed_steps(run_step, steps, out)
    close()


def child_peer(config: str, overrides: list[str], steps: int, out: Path) -> None:
    from steps import peer_step

    run_step = peer_step(config, overrides)
    for i in range(3):  # the first compiles
        run_step(i)
    timed_steps(lambda i: run_step(3 + i), steps, out)


def perf_table(data: Path) -> list[tuple[float, str, str]]:
    """(percent of samples, library, symbol) per symbol of a perf.data file."""
    report = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--sort", "dso,sym", "--stdio", "-q",
                             "-g", "none", "--percent-limit", "0", "-t", "\t"], capture_output=True, text=True, check=True)
    rows = []
    for line in report.stdout.splitlines():
        fields = [f.strip() for f in line.split("\t")]
        if len(fields) >= 3 and fields[0].endswith("%"):
            rows.append((float(fields[0].rstrip("%")), fields[1], re.sub(r"^\[[.k]\]\s*", "", fields[2])))
    return rows


def sample_side(side: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ctl, ack, data, out = (Path(tmp, name) for name in ("ctl", "ack", "perf.data", "times.json"))
        os.mkfifo(ctl)
        os.mkfifo(ack)
        child = [sys.executable, os.path.abspath(__file__), "--child", side, "--config", args.config,
                 "--steps", str(args.steps), "--times-out", str(out), *args.overrides]
        env = dict(os.environ, LMJAX_PERF_CTL=str(ctl), LMJAX_PERF_ACK=str(ack))
        perf = ["perf", "record", "-F", "999", "-D", "-1", "--control", f"fifo:{ctl},{ack}", "-o", str(data), "--", *child]
        returncode = subprocess.run(perf, env=env, stdout=sys.stderr).returncode
        if returncode or not out.exists():
            paranoid = Path("/proc/sys/kernel/perf_event_paranoid")
            raise SystemExit(f"cpu_samples: perf record of the {side} side exited with {returncode} (its messages are above; "
                             f"perf_event_paranoid is {paranoid.read_text().strip() if paranoid.exists() else 'unknown'}, "
                             f"sampling one's own processes needs <= 2)")
        times = json.loads(out.read_text())
        rows = perf_table(data)
        perf_map = times.pop("perf_map")
        if perf_map:  # the child wrote it for this report only
            Path(perf_map).unlink(missing_ok=True)
    total = sum(p for p, _, _ in rows) or 1.0
    by_category: dict[str, float] = {}
    for percent, dso, symbol in rows:
        name = categorize(dso, symbol)
        by_category[name] = by_category.get(name, 0.0) + percent / total
    cpu = times["cpu_s_per_step"]
    return {
        **times,
        "cores_busy": cpu / times["step_time_s"],
        "matmul_cpu_s_per_step": cpu * sum(share for name, share in by_category.items() if name.startswith("matmul")),
        "element_wise_cpu_s_per_step": cpu * sum(share for name, share in by_category.items() if name.startswith("element-wise")),
        "categories": {name: {"share": share, "cpu_s_per_step": share * cpu}
                       for name, share in sorted(by_category.items(), key=lambda kv: -kv[1])},
        "top_symbols": [{"percent": p * 100 / total, "dso": d, "symbol": s[:160]} for p, d, s in rows[:args.top]],
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("overrides", nargs="*", help="lmjax key=value overrides")
    p.add_argument("--config", default="configs/bench_cpu.yaml")
    p.add_argument("--side", choices=("lmjax", "peer", "both"), default="both")
    p.add_argument("--style", choices=("llama", "gpt2"), default="llama")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10, help="timed (sampled) steps")
    p.add_argument("--out", default=None, help="write both sides' tables as JSON")
    p.add_argument("--top", type=int, default=25, help="how many of the hottest symbols to keep per side")
    p.add_argument("--child", choices=("lmjax", "peer"), help=argparse.SUPPRESS)
    p.add_argument("--times-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:  # overrides are final here: the parent resolved them
        run = child_lmjax if args.child == "lmjax" else child_peer
        run(args.config, args.overrides, args.steps, Path(args.times_out))
        return {}
    if shutil.which("perf") is None:
        p.error("needs Linux perf on the PATH (Debian: apt-get install linux-perf)")
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    from peer import PeerError, lmjax_overrides, peer_cli_args

    from lmjax.config import load_config
    from lmjax.errors import UserError

    args.overrides = lmjax_overrides(args.style, args.seq_len, args.batch, args.overrides)
    sides = ("lmjax", "peer") if args.side == "both" else (args.side,)
    try:  # bad configs fail here, in one line, not inside a child under perf
        cfg = load_config(args.config, args.overrides)
        if "peer" in sides:
            peer_cli_args(cfg)
    except (UserError, PeerError) as e:
        p.error(str(e))
    result = {"config": args.config, "overrides": args.overrides, "steps": args.steps,
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "sides": {}}
    for side in sides:
        r = result["sides"][side] = sample_side(side, args)
        print(f"{side}: step {r['step_time_s'] * 1e3:,.0f} ms, {r['cpu_s_per_step']:.2f} CPU s per step "
              f"({r['cores_busy']:.2f} cores busy); matmul {r['matmul_cpu_s_per_step']:.2f} s, "
              f"element-wise {r['element_wise_cpu_s_per_step']:.2f} s")
        for name, c in r["categories"].items():
            print(f"  {name:56s} {c['cpu_s_per_step']:6.2f} s  {c['share']:6.1%}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))  # peer.py, beside this file
    main()
