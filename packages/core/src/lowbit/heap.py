"""Giving freed memory back to the operating system (glibc's allocator on Linux)."""

from __future__ import annotations

import ctypes
import sys

_LIBC: list = []


def return_freed_memory() -> bool:
    """Give freed memory back to the OS (glibc on Linux; True when done); called between layers.

    glibc raises its mmap threshold each time a large block is freed, after which heaps fragment and
    never shrink; with a threshold below an activation's size (its 128 KiB start, or the 4 MiB used
    before) every activation-sized tensor is a fresh mmap whose pages fault in again. So the thresholds
    are fixed: blocks under 64 MiB (a calibration batch's activations) come from the heap and stay
    mapped within a layer (no trim under 512 MiB free), and ``malloc_trim`` after each layer returns
    what the layer freed (benchmarks/NOTES.md has the measurement); GPTQ also calls it after each linear of
    a stage with many inputs (a MoE layer's experts), whose temporaries otherwise fragment the heap by a GB
    or more (benchmarks/scale/RESULTS.md). Process-wide, cheap, and results are unchanged."""
    if not sys.platform.startswith("linux"):
        return False
    if not _LIBC:
        try:
            libc = ctypes.CDLL("libc.so.6")
            m_trim_threshold, m_mmap_threshold = -1, -3
            libc.mallopt(m_mmap_threshold, 64 << 20)
            libc.mallopt(m_trim_threshold, 512 << 20)
            _LIBC.append(libc)
        except (OSError, AttributeError):  # musl or no libc.so.6: keep the allocator's defaults
            _LIBC.append(None)
    if _LIBC[0] is None:
        return False
    _LIBC[0].malloc_trim(0)
    return True
