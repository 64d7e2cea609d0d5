"""What this CPU can do: instruction-set flags read once from /proc/cpuinfo (Linux, x86-64)."""

from __future__ import annotations

import functools
import platform


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The ``flags`` of the first processor in /proc/cpuinfo; empty where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def is_x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def has_avx2_fma() -> bool:
    f = cpu_flags()
    return {"avx2", "fma", "f16c"} <= f


def has_fast_bf16_matmul() -> bool:
    """AMX-BF16: oneDNN's bf16 matmul runs on the tiles, several times faster than fp32.

    AVX512-BF16 alone does not make bf16 faster: on a Xeon exposing it without AMX, bf16 GEMMs ran at
    ~0.6x fp32 (145 vs 250 GFLOPS, 2 threads); on AVX2 bf16 is emulated (~1/6 of fp32).
    """
    return "amx_bf16" in cpu_flags()


def describe() -> str:
    f = cpu_flags()
    isa = [x for x in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8") if x in f]
    return f"{cpu_name()} ({', '.join(isa) or 'no SIMD flags found'})"
