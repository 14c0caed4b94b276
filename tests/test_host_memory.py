"""The host heap: `release_free_heap` hands freed pages back to the OS (glibc's malloc_trim,
jemalloc's purge), and the `lmjax` command's choice of malloc (`restart_environment`)."""

import ctypes
import os
import subprocess
import sys
import threading

import pytest

from lmjax import host_memory
from lmjax.host_memory import release_free_heap, restart_environment

MiB = 2**20


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim and /proc are Linux's")
def test_freed_heap_memory_leaves_the_process():
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    block, n = 64 * 1024, 3200  # 200 MiB of blocks below malloc's mmap threshold: heap memory
    measured = {}

    def allocate_touch_free():  # on a thread of its own, as XLA compiles: a per-thread arena
        blocks = [libc.malloc(block) for _ in range(n)]
        for b in blocks:
            ctypes.memset(b, 1, block)
        for b in blocks[:-1]:  # the last stays allocated: the freed space is not the heap's top,
            libc.free(b)       # which glibc would trim by itself
        measured["freed"] = _resident_bytes()
        measured["released"] = release_free_heap()
        measured["after"] = _resident_bytes()
        libc.free(blocks[-1])

    thread = threading.Thread(target=allocate_touch_free)
    thread.start()
    thread.join()
    assert measured["released"] is True
    # Nearly all of the 200 MiB leaves the resident set; without the trim it would stay.
    assert measured["freed"] - measured["after"] > 150 * MiB, measured


def test_restart_environment_prefers_jemalloc_and_keeps_the_users_choices():
    conf, jemalloc = host_memory.JEMALLOC_CONF, "libjemalloc.so.2"
    found = lambda: jemalloc  # noqa: E731
    env = restart_environment({"LD_PRELOAD": "/x/libfoo.so", "PATH": "/bin"}, "linux", found)
    assert env == {"LD_PRELOAD": "libjemalloc.so.2 /x/libfoo.so", "MALLOC_CONF": conf, "PATH": "/bin"}
    assert restart_environment({"MALLOC_CONF": "narenas:2"}, "linux", found)["MALLOC_CONF"] == "narenas:2"
    # Without jemalloc, or with it switched off: glibc's huge pages, after the user's own tunables.
    for environ, library in (({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, None),
                             ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "LMJAX_JEMALLOC": "off"}, jemalloc)):
        env = restart_environment(environ, "linux", lambda: library)
        assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1" and "LD_PRELOAD" not in env
    # Chosen already (a restarted process, a user's own), opted out, or not Linux: no restart, and no
    # search for the library either (every command's restarted process comes here).
    def never():
        raise AssertionError("searched for jemalloc where no restart is due")

    for environ, platform in (({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, "linux"),
                              ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "linux"),
                              ({"LMJAX_HUGEPAGE_MALLOC": "OFF"}, "linux"), ({}, "darwin")):
        assert restart_environment(environ, platform, never) is None


BLOCK_TWICE = """
import ctypes, resource
from lmjax.host_memory import jemalloc_in_use, release_free_heap

libc = ctypes.CDLL(None)  # malloc as XLA:CPU's allocations resolve it
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 600 * 2**20  # XLA:CPU's temporaries of one bench_cpu step, about

def resident():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

def touch_and_free():  # one step: the block taken, written, freed
    block = libc.malloc(size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ctypes.memset(block, 1, size)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    libc.free(block)
    return faults

first, second = touch_and_free(), touch_and_free()
kept = resident()
release_free_heap()
print(jemalloc_in_use(), first, second, kept - resident())
"""


@pytest.mark.skipif(host_memory.find_jemalloc() is None, reason="jemalloc is not installed (apt-get install libjemalloc2)")
def test_jemalloc_as_set_keeps_a_freed_block_for_the_next_step_and_releases_it_when_asked(tmp_path):
    """What the `lmjax` command's jemalloc is for: a block freed and taken again, as XLA:CPU does
    with a step's temporaries, is not faulted in again; `release_free_heap` hands it back."""
    script = tmp_path / "block_twice.py"
    script.write_text(BLOCK_TWICE)
    env = restart_environment({k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF", "LMJAX_JEMALLOC")},
                              sys.platform, host_memory.find_jemalloc)
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120, check=True)
    in_use, first, second, released = result.stdout.split()
    assert in_use == "True"
    assert int(first) > 0  # the first touch faults the block in (in 2 MiB or 4 KiB pages)
    assert int(second) < 100, result.stdout  # the second finds it mapped: 153,600 faults with 4 KiB pages otherwise
    assert int(released) > 500 * MiB, result.stdout
