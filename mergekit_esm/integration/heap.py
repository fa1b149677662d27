"""glibc's allocator, tuned for the pre-pass: hundreds of 1–128 MiB tensors freed per layer.

Without this ESM's anonymous peak grows with depth although nothing it holds does: freed
memory stays in glibc's heaps, fragmented, and each layer starts from a higher floor.
Both calls do nothing on other C libraries.
"""

import ctypes
import functools
import os


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def map_large_allocations() -> bool:
    """Fix glibc's mmap threshold at 1 MiB, so that freed tensors of 1 MiB and more go back to
    the system. Returns whether it was set: not on other C libraries, nor where the user set
    MALLOC_MMAP_THRESHOLD_ (their choice stands).

    By default glibc raises the threshold (up to 32 MiB) as large blocks are freed, and then
    serves the pre-pass's many 1–32 MiB tensors (each window's activations and hidden states)
    from its heap, which fragments, so the peak grows with depth (measured in
    docs/performance.md).
    """
    libc = _glibc()
    if libc is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    return bool(libc.mallopt(-3, 1 << 20))  # -3: M_MMAP_THRESHOLD in glibc's malloc.h


def trim_heap() -> bool:
    """Hand the free pages inside glibc's heaps back to the system (malloc_trim(0)), after each
    layer: the allocations below the mmap threshold fragment the heaps too, and glibc only
    returns what lies at a heap's top. Milliseconds a call; without it the pre-pass's peaks
    creep up layer by layer."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)  # returns whether anything was released, which varies run to run
    return True
