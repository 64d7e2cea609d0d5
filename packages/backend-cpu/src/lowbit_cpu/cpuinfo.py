"""What this CPU can do, for the CPU kernels: lowbit's CPU facts (:mod:`lowbit.cpuinfo`) plus the
instruction sets this backend's native kernels need."""

from __future__ import annotations

from lowbit.cpuinfo import cpu_flags, cpu_name, describe, has_fast_bf16_matmul, is_x86_64

__all__ = ["cpu_flags", "cpu_name", "describe", "has_avx2_fma", "has_fast_bf16_matmul", "is_x86_64"]


def has_avx2_fma() -> bool:
    return {"avx2", "fma", "f16c"} <= cpu_flags()
