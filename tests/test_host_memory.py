"""`release_free_heap` hands freed heap pages back to the OS (glibc's malloc_trim)."""

import ctypes
import sys
import threading

import pytest

from lmjax.host_memory import release_free_heap

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
