"""The host heap: which malloc serves an `lmjax` process, and handing its free pages back to the OS.

**Which malloc.** XLA:CPU allocates an executable's temporaries afresh on every run, as one block
(596 MB for `configs/bench_cpu.yaml`'s step), and frees it after. glibc hands blocks that large
out as new mmaps, so every step faults the block in again and the kernel zeroes it: ~550 faults of
2 MiB pages per step with glibc's huge pages, and where the host's memory is fragmented, direct
compaction for each of them (0.5-1.1 s of system time in every other step on a 2-vCPU VM,
experiments/bench/README.md, "Sixteenth round"). jemalloc, set to keep what is freed
(`JEMALLOC_CONF`), hands the same block back on the next step: no faults, no system time. With
asynchronous dispatch the next step's block would be taken while the last one still runs, and both
would stay resident, so under jemalloc the CLI also runs single-device CPU programs inline
(jax's `jax_cpu_enable_async_dispatch` off, `lmjax.cli.dispatch_inline_under_jemalloc`).

The `lmjax` command restarts itself once (`restart_environment`): with jemalloc preloaded where
the system has it (`apt-get install libjemalloc2`), else with glibc's transparent huge pages
(~1k faults per step instead of ~144k with 4 KiB pages). LMJAX_JEMALLOC=off keeps glibc;
LMJAX_HUGEPAGE_MALLOC=off skips the restart.

**Handing pages back.** Compiling a train step is allocation-heavy (LLVM, XLA's passes) and runs
on XLA's threads, so its memory lives in per-thread arenas. Freed, it stays in the process: glibc
only returns the free space at the top of an arena's heap, and jemalloc as set here returns
nothing by itself. On `configs/bench_cpu.yaml` that is ~230 MiB kept resident under every step's
temporaries. `release_free_heap` (after each compile) releases it: peak RSS ~1.39 -> ~1.15 GiB
(experiments/bench/README.md, "Fifth round").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from typing import Callable, Mapping

from lmjax.switches import switched_off

HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"
# Requests of every size are served from the ordinary arenas (no dedicated arena that unmaps large
# blocks at once: oversize_threshold 0), freed pages are kept for the next request (no decay: XLA's
# block comes back every step, and a purge in between would fault it in again), and arenas ask for
# transparent huge pages. What a compile leaves behind goes back through `release_free_heap`.
JEMALLOC_CONF = "oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1,thp:always"
# jemalloc 5's MALLCTL_ARENAS_ALL: "arena.4096.purge" purges every arena.
_PURGE_ALL_ARENAS = b"arena.4096.purge"


def find_jemalloc() -> str | None:
    """The jemalloc shared library's name for LD_PRELOAD (e.g. libjemalloc.so.2), or None."""
    return ctypes.util.find_library("jemalloc")


def restart_environment(environ: Mapping[str, str], platform: str,
                        find: Callable[[], str | None]) -> dict[str, str] | None:
    """The environment to re-execute the command with, or None to run it as it is: off Linux, when
    LMJAX_HUGEPAGE_MALLOC=off, and when the allocator is already chosen (a restarted process, or a
    user who set LD_PRELOAD to jemalloc or glibc's hugetlb tunable). `find` is `find_jemalloc`, called
    only when a restart is due: the restarted process, every command's second start, skips the
    library search (~30 ms where jemalloc is missing and ctypes falls back to the compiler)."""
    preload, tunables = environ.get("LD_PRELOAD", ""), environ.get("GLIBC_TUNABLES", "")
    if (not platform.startswith("linux") or switched_off("LMJAX_HUGEPAGE_MALLOC", environ)
            or "jemalloc" in preload or "glibc.malloc.hugetlb" in tunables):
        return None
    jemalloc = None if switched_off("LMJAX_JEMALLOC", environ) else find()
    if jemalloc:
        # A MALLOC_CONF the user set is theirs to keep (jemalloc reads it; glibc ignores it).
        return {**environ, "LD_PRELOAD": " ".join(filter(None, (jemalloc, preload))),
                "MALLOC_CONF": environ.get("MALLOC_CONF") or JEMALLOC_CONF}
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, (tunables, HUGEPAGE_TUNABLE)))}


@functools.cache
def _allocator_calls():
    """(jemalloc's mallctl, glibc's malloc_trim), each None where this process lacks it."""
    if not sys.platform.startswith("linux"):
        return None, None
    process = ctypes.CDLL(None)  # the symbols the process resolves: a preloaded jemalloc's first
    mallctl = getattr(process, "mallctl", None)
    if mallctl is not None:
        mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        mallctl.restype = ctypes.c_int
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim  # glibc's; musl lacks it
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):
        trim = None
    return mallctl, trim


def jemalloc_in_use() -> bool:
    """Whether jemalloc serves this process's malloc (preloaded by the `lmjax` command)."""
    return _allocator_calls()[0] is not None


def allocator() -> str:
    """Which malloc serves this process and how it is set, for benchmark records: e.g.
    `jemalloc (MALLOC_CONF=...)`, `glibc (GLIBC_TUNABLES=glibc.malloc.hugetlb=1)`, `glibc`."""
    if jemalloc_in_use():
        name, variable = "jemalloc", "MALLOC_CONF"
    elif _allocator_calls()[1] is not None:
        name, variable = "glibc", "GLIBC_TUNABLES"
    else:
        return "system"
    setting = os.environ.get(variable)
    return f"{name} ({variable}={setting})" if setting else name


def release_free_heap() -> bool:
    """Returns the free pages of every malloc arena to the OS: jemalloc's purge of all arenas where
    it serves the process, and glibc's `malloc_trim(0)` (whose arenas still hold what was allocated
    before a preloaded jemalloc took over, and everything when it did not). What is still allocated
    is untouched. False where neither exists (nothing done). Cheap next to a compile: call it after
    one, not every step."""
    mallctl, trim = _allocator_calls()
    if mallctl is not None:
        mallctl(_PURGE_ALL_ARENAS, None, None, None, 0)
    if trim is not None:
        trim(0)
    return mallctl is not None or trim is not None
