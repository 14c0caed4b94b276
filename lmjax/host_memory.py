"""Handing the host heap's free pages back to the OS after XLA compiles.

Compiling a train step is allocation-heavy (LLVM, XLA's passes) and runs on XLA's threads, so
its memory lives in glibc's per-thread malloc arenas. Freed, it stays in the process: glibc only
returns the free space at the top of an arena's heap, and compilation leaves the arenas
fragmented. On `configs/bench_cpu.yaml` that is ~230 MiB kept resident under every step's
~600 MiB of temporaries, which XLA:CPU maps afresh on each run: the process's peak RSS
(1.39 GiB) is mostly the two added together. `malloc_trim(0)` walks every arena and releases
the free pages in the middle of them too; after the compile, the step's peak falls to ~1.15 GiB
(experiments/bench/README.md, "Fifth round").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim  # glibc's; musl and others lack it
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_heap() -> bool:
    """Returns the free pages of every glibc malloc arena to the OS (`malloc_trim(0)`); what is
    still allocated is untouched. False where there is no glibc (nothing done). It walks every
    arena, cheap next to a compile: call it after one, not every step."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
