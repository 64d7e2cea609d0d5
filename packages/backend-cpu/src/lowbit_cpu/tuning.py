"""Measured tuning data of the CPU kernels (see benchmarks/cpu/RESULTS.md for how it was taken).

``PREFILL_MIN_BATCH``: from this many activation rows on, ``cpu.avx2_int4`` stops running its
fused GEMV and dequantizes the weight tile by tile into a float buffer for one oneDNN/MKL
matmul per tile. Below it the fused kernel (cost ~ linear in rows, bounded by SIMD decode and
FMA throughput) wins; above it the BLAS matmul (cost ~ rows at near-peak FLOP/s plus one
dequantization pass) wins. Keyed by whether the CPU has native bf16 matmul (AMX/AVX512-BF16)
and by activation dtype. Override with ``LOWBIT_CPU_PREFILL_MIN_BATCH``.
"""

from __future__ import annotations

import os

import torch

from lowbit.errors import LowbitError

# measured on AMD EPYC (Zen 3, AVX2, 2 cores) with 4096x4096 g128; see RESULTS.md
PREFILL_MIN_BATCH = {
    # (native bf16 matmul?, activation dtype): rows
    (False, torch.bfloat16): 16,
    (False, torch.float16): 16,
    (False, torch.float32): 16,
    # not measured here (no AMX on the development machine): AMX bf16 matmul is fast, so the
    # crossover comes earlier; 16 keeps the fused GEMV for decode and small speculative batches
    (True, torch.bfloat16): 16,
    (True, torch.float16): 16,
    (True, torch.float32): 16,
}

# rows of the weight dequantized per tile of the prefill path: a tile of about 2 MiB (fp32)
TILE_BYTES = 2 << 20


def prefill_min_batch(native_bf16: bool, dtype: torch.dtype) -> int:
    env = os.environ.get("LOWBIT_CPU_PREFILL_MIN_BATCH", "").strip()
    if env:
        try:
            return int(env)
        except ValueError:
            raise LowbitError(
                f"LOWBIT_CPU_PREFILL_MIN_BATCH={env!r} is not an integer; set a row count such as 16, or unset it."
            ) from None
    return PREFILL_MIN_BATCH[(native_bf16, dtype)]


def tile_rows(k: int) -> int:
    return max(16, (TILE_BYTES // (4 * k)) // 16 * 16)
