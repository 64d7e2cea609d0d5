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
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K):
        k0 = kt * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = load_x_tile(x_ptr, perm_ptr, offs_m, offs_k, M, K, stride_xm, HAS_PERM)
        w = dequant_tile(w_ptr, s_ptr, z_ptr, g_ptr, offs_k, offs_n, k0, N, K, GROUP_SIZE, BITS, SYM, GROUP_PER_ROW)
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
    x = check_launch(x, w, "w4a16_gemm")
    m, k, n = x.shape[0], w.in_features, w.out_features
    if config is None:
        config = configs.lookup("gemm", m, device_name(x.device))
    check_config(config, CONFIG_KEYS, "w4a16_gemm")
    block_m, block_n = config["BLOCK_M"], config["BLOCK_N"]
    block_k = effective_block_k(config["BLOCK_K"], w)
    k_tiles = triton.cdiv(k, block_k)
    tiles_mn = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split_k = min(config["SPLIT_K"] or auto_split_k(tiles_mn, k_tiles, x.device), k_tiles)
    if split_k == 1:
        y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    else:
        y = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    w4a16_gemm_kernel[(tiles_mn, split_k)](
        x, w.qweight, w.scales,
        dummy(w) if w.zeros is None else w.zeros,
        dummy(w) if w.g_idx is None else w.g_idx,
        dummy(w) if w.perm is None else w.perm,
        dummy(w) if w.bias is None else w.bias,
        y,
        m, n, k, k if w.group_size == -1 else w.group_size, x.stride(0), y.stride(0),
        BITS=w.bits, SYM=w.zeros is None, GROUP_PER_ROW=w.g_idx is not None, HAS_PERM=w.perm is not None,
        HAS_BIAS=w.bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, GROUP_M=config["GROUP_M"],
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return y if split_k == 1 else y.to(x.dtype)
