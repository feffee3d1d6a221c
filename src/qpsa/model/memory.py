"""Keep freed activation memory in the process instead of handing it back to the kernel.

A forward pass allocates and frees the same few tensor sizes (tens of MB each) over and over.
glibc serves allocations above its mmap threshold (dynamic, from 128 KiB up to 32 MiB depending
on the history of the process) with fresh `mmap`s and unmaps them on free, so every layer
page-faults its outputs in again: on SmolLM2 that was ~40 ms of an 850 ms perplexity window
(SiLU, the gate×up product and the residual adds ran 3–5× slower than on reused memory). Raising
the threshold and switching off trimming makes glibc keep that memory on its heap and reuse it,
much as PyTorch's GPU caching allocator does. The price: the process keeps its peak heap until
it exits. Elsewhere than glibc (macOS, musl) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

MMAP_THRESHOLD = 64 * 2**20  # allocations up to this size come from the reusable heap
TRIM_THRESHOLD = 2**31 - 1  # free heap kept before any is returned (mallopt takes an int)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc's malloc to reuse freed memory; True where it took effect. Idempotent."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
