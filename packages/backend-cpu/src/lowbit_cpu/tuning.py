"""Measured tuning data of the CPU kernels (see benchmarks/cpu/RESULTS.md for how it was taken).

``PREFILL_MIN_BATCH``: from this many activation rows on, ``cpu.avx2_int4`` stops running its
fused GEMV and dequantizes the weight tile by tile into a float buffer for one oneDNN/MKL
matmul per tile. Below it the fused kernel (cost ~ linear in rows, bounded by SIMD decode and
FMA throughput) wins; above it the BLAS matmul (cost ~ rows at near-peak FLOP/s plus one
dequantization pass) wins. Keyed by whether the CPU has fast bf16 matmul (AMX)
and by activation dtype. Override with ``LOWBIT_CPU_PREFILL_MIN_BATCH``.
"""

from __future__ import annotations

import os

import torch

from lowbit.errors import LowbitError

# Measured on AMD EPYC (Zen 3, AVX2, no AVX-512/AMX), 4096x4096 w4 g128, one thread, CPU time
# per call (ms), fused GEMV / tiled dequant + matmul:
#   bf16 activations: M=16 8.5 / 12.0, M=24 12.9 / 17.6, M=32 17.6 / 17.8, M=48 30.1 / 24.3
#   fp32 activations: M=12 10.6 / 16.8, M=16 14.4 / 10.5, M=24 22.1 / 16.2
# (the int16 fused path is ~1.7x the fp32 one per row, so its crossover comes later)
PREFILL_MIN_BATCH = {
    # (native bf16 matmul?, activation dtype): rows
    (False, torch.bfloat16): 32,
    (False, torch.float16): 32,
    (False, torch.float32): 16,
    # bf16 measured on a Sapphire Rapids Xeon (AMX), cpu.vnni_int4, w4 g64, one thread, CPU time
    # per call (ms), fused VNNI GEMV / tiled (table-lookup dequant to bf16 + AMX matmul):
    #   576x1536: M=16 0.34 / 0.26 (0.37 with the fp32 dequant + cast), M=32 0.66 / 0.30
    #   1536x576: M=16 0.29 / 0.26, M=32 0.57 / 0.28;  4096x4096: M=16 6.3 / 4.5, M=32 12.3 / 6.0
    # so tiles from 16 rows on; fp16/fp32 (cpu.avx2_int4's int16/fp32 paths, fp32 tiles) not re-measured.
    (True, torch.bfloat16): 16,
    (True, torch.float16): 16,
    (True, torch.float32): 16,
}

# rows of the weight dequantized per tile of the prefill path: a tile of about 8 MiB (fp32),
# which fits the L3 of current server CPUs; every tile costs two fork/join barriers (dequant,
# matmul), and on a loaded machine each barrier can wait a scheduler time slice, so fewer,
# larger tiles are much steadier (2 MiB tiles made 11008x4096 at batch 128 10x slower under load)
TILE_BYTES = 8 << 20


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


MAX_TILES = 8


def tile_rows(n: int, k: int) -> int:
    """Rows per prefill tile: about TILE_BYTES of fp32, at least 64, and at most MAX_TILES tiles per
    call (so the transient buffer is at most max(TILE_BYTES, the layer's 4-bit size))."""
    rows = max(64, (TILE_BYTES // (4 * k)) // 16 * 16, -(-n // MAX_TILES))
    return min(n, -(-rows // 16) * 16)
