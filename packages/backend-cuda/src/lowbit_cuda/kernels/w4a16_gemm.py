"""Tiled GEMM for prefill: ``y[M, N] = x[M, K] @ dequant(W)[K, N] (+ bias)``.

Each program owns a ``BLOCK_M × BLOCK_N`` output tile and walks K in ``BLOCK_K`` steps: load the
activation tile (through the act-order permutation), unpack and dequantize the weight tile in
registers, ``tl.dot`` into an fp32 accumulator. Program ids are grouped ``GROUP_M`` row-blocks at a
time so neighbouring programs reuse weight tiles from L2 (Triton tutorial 03). ``SPLIT_K > 1``
splits the K walk over programs that meet in an fp32 buffer through atomics, for short-and-wide
shapes where the M × N tiles alone leave SMs idle.

Launch configurations live in ``lowbit_cuda.configs`` as data per GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..packing import TritonPackedWeight
from .common import launch, store_tile, tile_product

CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "GROUP_M", "num_warps", "num_stages")


@triton.jit
def w4a16_gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, g_ptr, perm_ptr, b_ptr, y_ptr,
    M, N, K, GROUP_SIZE, stride_xm, stride_ym,
    BITS: tl.constexpr, SYM: tl.constexpr, GROUP_PER_ROW: tl.constexpr, HAS_PERM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_pid(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tile_product(x_ptr, w_ptr, s_ptr, z_ptr, g_ptr, perm_ptr, offs_m, offs_n, pid_k, M, N, K, GROUP_SIZE,
                       stride_xm, BITS, SYM, GROUP_PER_ROW, HAS_PERM, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, False)
    store_tile(acc, b_ptr, y_ptr, offs_m, offs_n, pid_k, M, N, stride_ym, HAS_BIAS, SPLIT_K)


@triton.jit
def grouped_pid(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id → (row block, column block), ``GROUP_M`` row blocks sweeping each column block."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_in_group = GROUP_M * num_pid_n
    first_m = (pid // pids_in_group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % pids_in_group) % group_m)
    pid_n = (pid % pids_in_group) // group_m
    return pid_m, pid_n


def w4a16_gemm(x: torch.Tensor, w: TritonPackedWeight, config: dict | None = None) -> torch.Tensor:
    """``x [M, K]`` (fp16/bf16, any M; meant for M > 16) → ``[M, N]`` in ``x.dtype``.

    :param config: launch config overriding the per-GPU table (keys ``CONFIG_KEYS``).
    """
    return launch(w4a16_gemm_kernel, "w4a16_gemm", "gemm", CONFIG_KEYS, x, w, config,
                  lambda m, n, bm, bn, split_k: (triton.cdiv(m, bm) * triton.cdiv(n, bn), split_k))
