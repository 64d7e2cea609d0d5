"""Split-K GEMV for decode (batch 1-16): ``y[M, N] = x[M, K] @ dequant(W)[K, N] (+ bias)``.

Decode reads every weight once per token, so it is bound by memory bandwidth: the grid has one
program per (BLOCK_N column block, K split, BLOCK_M row block), each streaming its share of the
packed weight, dequantizing it in registers and reducing over its K range in fp32. With
``SPLIT_K > 1`` the partial sums meet in an fp32 buffer through atomics (then one cast); with
``BLOCK_M == 1`` the product is a broadcast multiply-add (no tensor cores needed for one row),
otherwise a ``tl.dot`` over a padded row block.

Launch configurations live in ``lowbit_cuda.configs`` as data per GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..packing import TritonPackedWeight
from .common import launch, store_tile, tile_product

CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "num_warps", "num_stages")


@triton.jit
def w4a16_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, g_ptr, perm_ptr, b_ptr, y_ptr,
    M, N, K, GROUP_SIZE, stride_xm, stride_ym,
    BITS: tl.constexpr, SYM: tl.constexpr, GROUP_PER_ROW: tl.constexpr, HAS_PERM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tile_product(x_ptr, w_ptr, s_ptr, z_ptr, g_ptr, perm_ptr, offs_m, offs_n, pid_k, M, N, K, GROUP_SIZE,
                       stride_xm, BITS, SYM, GROUP_PER_ROW, HAS_PERM, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K,
                       BLOCK_M == 1)
    store_tile(acc, b_ptr, y_ptr, offs_m, offs_n, pid_k, M, N, stride_ym, HAS_BIAS, SPLIT_K)


def w4a16_gemv(x: torch.Tensor, w: TritonPackedWeight, config: dict | None = None) -> torch.Tensor:
    """``x [M, K]`` (fp16/bf16, M ≤ 16 is the intended range) → ``[M, N]`` in ``x.dtype``.

    :param config: launch config overriding the per-GPU table (keys ``CONFIG_KEYS``).
    """
    return launch(w4a16_gemv_kernel, "w4a16_gemv", "gemv", CONFIG_KEYS, x, w, config,
                  lambda m, n, bm, bn, split_k: (triton.cdiv(n, bn), split_k, triton.cdiv(m, bm)))
