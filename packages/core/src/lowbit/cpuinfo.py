"""What this CPU can do: its name and instruction-set flags, read once from /proc/cpuinfo (Linux, x86-64).

One place for the rules that depend on them (which matmul dtype is fast here), shared by the pipeline,
the benchmarks and the CPU backend.
"""

from __future__ import annotations

import functools
import platform

# the flags that decide matmul and kernel speed, in the order reports list them
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def _cpuinfo_field(key: str) -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The ``flags`` of the first processor in /proc/cpuinfo; empty where there is none."""
    return frozenset((_cpuinfo_field("flags") or "").split())


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def is_x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def isa(flags: frozenset[str] | set[str] | None = None) -> list[str]:
    """The :data:`ISA_FLAGS` this CPU (or ``flags``) has."""
    flags = cpu_flags() if flags is None else flags
    return [x for x in ISA_FLAGS if x in flags]


def has_fast_bf16_matmul(flags: frozenset[str] | set[str] | None = None) -> bool:
    """AMX-BF16: oneDNN's bf16 matmul runs on the tiles, several times faster than fp32.

    AVX512-BF16 alone does not make bf16 faster: on a Xeon exposing it without AMX, PyTorch's bf16 GEMMs
    ran at ~0.6x fp32 (~145 vs ~250 GFLOPS, 2 threads, 4096 x 576 x 1536); on AVX2 bf16 is emulated
    (~1/6 to 1/8 of fp32). ``flags``: the CPU's flags (default: this machine's).
    """
    return "amx_bf16" in (cpu_flags() if flags is None else flags)


def describe() -> str:
    return f"{cpu_name()} ({', '.join(isa()) or 'no SIMD flags found'})"
