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

from .. import configs
from ..packing import TritonPackedWeight
from .common import (
    auto_split_k,
    check_config,
    check_launch,
    dequant_tile,
    device_name,
    dummy,
    effective_block_k,
    load_x_tile,
)

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
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K):  # K tiles interleaved over the splits
        k0 = kt * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = load_x_tile(x_ptr, perm_ptr, offs_m, offs_k, M, K, stride_xm, HAS_PERM)
        w = dequant_tile(w_ptr, s_ptr, z_ptr, g_ptr, offs_k, offs_n, k0, N, K, GROUP_SIZE, BITS, SYM, GROUP_PER_ROW)
        if BLOCK_M == 1:
            acc += tl.sum(tl.trans(x.to(tl.float32)) * w, axis=0, keep_dims=True)
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)
    mask_n = offs_n < N
    if HAS_BIAS:  # added once, by the first split
        bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0)
        acc += tl.where(pid_k == 0, bias, 0.0)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=mask)


def w4a16_gemv(x: torch.Tensor, w: TritonPackedWeight, config: dict | None = None) -> torch.Tensor:
    """``x [M, K]`` (fp16/bf16, M ≤ 16 is the intended range) → ``[M, N]`` in ``x.dtype``.

    :param config: launch config overriding the per-GPU table (keys ``CONFIG_KEYS``).
    """
    x = check_launch(x, w, "w4a16_gemv")
    m, k, n = x.shape[0], w.in_features, w.out_features
    if config is None:
        config = configs.lookup("gemv", m, device_name(x.device))
    check_config(config, CONFIG_KEYS, "w4a16_gemv")
    block_m, block_n = config["BLOCK_M"], config["BLOCK_N"]
    block_k = effective_block_k(config["BLOCK_K"], w)
    k_tiles = triton.cdiv(k, block_k)
    grid_mn = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    split_k = min(config["SPLIT_K"] or auto_split_k(grid_mn, k_tiles, x.device), k_tiles)
    if split_k == 1:
        y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    else:
        y = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, block_n), split_k, triton.cdiv(m, block_m))
    w4a16_gemv_kernel[grid](
        x, w.qweight, w.scales,
        dummy(w) if w.zeros is None else w.zeros,
        dummy(w) if w.g_idx is None else w.g_idx,
        dummy(w) if w.perm is None else w.perm,
        dummy(w) if w.bias is None else w.bias,
        y,
        m, n, k, k if w.group_size == -1 else w.group_size, x.stride(0), y.stride(0),
        BITS=w.bits, SYM=w.zeros is None, GROUP_PER_ROW=w.g_idx is not None, HAS_PERM=w.perm is not None,
        HAS_BIAS=w.bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return y if split_k == 1 else y.to(x.dtype)
