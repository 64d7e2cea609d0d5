"""What the GEMM and the GEMV kernels share: the in-register dequantization of one weight tile,
the activation-tile load (through the act-order permutation), the tile product and store (their
body), and the launcher; the two kernels differ only in how program ids map to tiles."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..errors import LaunchError
from ..packing import TritonPackedWeight

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16)


@triton.jit
def load_x_tile(x_ptr, perm_ptr, offs_m, offs_k, M, K, stride_xm, HAS_PERM: tl.constexpr):
    """``x[offs_m, perm[offs_k]]`` as a ``[BLOCK_M, BLOCK_K]`` tile; rows ≥ M and columns ≥ K read 0."""
    mask_k = offs_k < K
    if HAS_PERM:
        cols = tl.load(perm_ptr + offs_k, mask=mask_k, other=0)
    else:
        cols = offs_k
    mask = (offs_m < M)[:, None] & mask_k[None, :]
    return tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)


@triton.jit
def dequant_tile(
    w_ptr, s_ptr, z_ptr, g_ptr, offs_k, offs_n, k0, N, K, GROUP_SIZE,
    BITS: tl.constexpr, SYM: tl.constexpr, GROUP_PER_ROW: tl.constexpr,
):
    """The fp32 ``[BLOCK_K, BLOCK_N]`` weights ``(code - zero) * scale`` of rows ``offs_k``.

    Codes come from ``qweight[k // P, n]`` bits ``[BITS*(k % P), +BITS)`` with ``P = 32 // BITS``.
    Without GROUP_PER_ROW the whole tile lies in group ``k0 // GROUP_SIZE`` (the launcher keeps
    BLOCK_K ≤ group size), so one row of scales and zeros serves it; with it every row reads its
    own group from ``g_idx``. Rows ≥ K and columns ≥ N come out finite (masked on the x side or
    at the store).
    """
    mask_n = offs_n < N
    mask_k = offs_k < K
    words = tl.load(
        w_ptr + (offs_k // (32 // BITS))[:, None] * N + offs_n[None, :],
        mask=mask_k[:, None] & mask_n[None, :],
        other=0,
    )
    codes = (words >> ((offs_k % (32 // BITS)) * BITS)[:, None]) & ((1 << BITS) - 1)
    if GROUP_PER_ROW:
        g = tl.load(g_ptr + offs_k, mask=mask_k, other=0)
        sz_off = g[:, None] * N + offs_n[None, :]
        sz_mask = mask_n[None, :]
    else:
        sz_off = (k0 // GROUP_SIZE) * N + offs_n[None, :]
        sz_mask = mask_n[None, :]
    scales = tl.load(s_ptr + sz_off, mask=sz_mask, other=0.0).to(tl.float32)
    if SYM:
        zeros = (1 << (BITS - 1)) * 1.0
    else:
        zeros = tl.load(z_ptr + sz_off, mask=sz_mask, other=0).to(tl.float32)
    return (codes.to(tl.float32) - zeros) * scales


def check_launch(x: torch.Tensor, w: TritonPackedWeight, kernel: str) -> torch.Tensor:
    """Validate a launch; return ``x`` as a 2-D tensor with unit stride along K."""
    if not isinstance(w, TritonPackedWeight):
        raise LaunchError(
            f"{kernel}: the weight must be a TritonPackedWeight, got {type(w).__name__}; "
            "make one with lowbit_cuda.packing.pack(qweight, device)."
        )
    if not isinstance(x, torch.Tensor):
        raise LaunchError(f"{kernel}: x must be a torch.Tensor, got {type(x).__name__}; pass the activations as a tensor.")
    if x.dim() != 2 or x.shape[1] != w.in_features:
        raise LaunchError(
            f"{kernel}: x must be [M, K={w.in_features}] for this {w.out_features}x{w.in_features} weight, "
            f"got {list(x.shape)}; reshape to (-1, {w.in_features}) (Kernel.forward does this for [..., K])."
        )
    if x.dtype not in ACTIVATION_DTYPES:
        raise LaunchError(
            f"{kernel}: activations must be float16 or bfloat16, got {str(x.dtype).replace('torch.', '')}; "
            "cast with x.half() (or run the layer in fp16/bf16)."
        )
    if x.device != w.device:
        raise LaunchError(
            f"{kernel}: x is on {x.device} but the packed weight is on {w.device}; move one with .to()."
        )
    if x.shape[0] == 0:
        raise LaunchError(f"{kernel}: x has no rows (M=0); call with at least one row.")
    if x.stride(1) != 1:
        x = x.contiguous()
    return x


def check_config(config: dict, keys: tuple[str, ...], kernel: str) -> None:
    """Every key present; block sizes powers of two."""
    missing = [k for k in keys if k not in config]
    if missing:
        raise LaunchError(f"{kernel}: config lacks {', '.join(missing)}; give all of {', '.join(keys)}.")
    for k in keys:
        v = config[k]
        if k.startswith("BLOCK_") and (not isinstance(v, int) or v < 1 or v & (v - 1)):
            raise LaunchError(f"{kernel}: config {k}={v!r} must be a power of two; pick 16, 32, 64 or 128.")
    if config.get("SPLIT_K", 1) < 0:
        raise LaunchError(f"{kernel}: config SPLIT_K={config['SPLIT_K']} must be ≥ 0 (0 = auto).")


def effective_block_k(block_k: int, w: TritonPackedWeight) -> int:
    """BLOCK_K clamped to the group width, so a tile never straddles two groups (one group per row: no clamp)."""
    if w.g_idx is None and w.group_width < w.in_features:
        return min(block_k, w.group_width)
    return block_k


@functools.cache
def device_name(device: torch.device) -> str:
    """The key of ``configs.CONFIGS`` for ``device`` ("default" off CUDA)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "default"


@functools.cache
def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def auto_split_k(tiles_mn: int, k_tiles: int, device: torch.device) -> int:
    """Split K so the grid covers about two waves of SMs (a power of two, at most 16)."""
    want = -(-2 * sm_count(device) // max(tiles_mn, 1))
    split = 1
    while split < want and split < 16 and split * 2 <= k_tiles:
        split *= 2
    return split


def dummy(w: TritonPackedWeight) -> torch.Tensor:
    """A pointer argument for a constexpr-disabled input (never read)."""
    return w.scales


@triton.jit
def tile_product(
    x_ptr, w_ptr, s_ptr, z_ptr, g_ptr, perm_ptr, offs_m, offs_n, pid_k,
    M, N, K, GROUP_SIZE, stride_xm,
    BITS: tl.constexpr, SYM: tl.constexpr, GROUP_PER_ROW: tl.constexpr, HAS_PERM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    ROW_BROADCAST: tl.constexpr,
):
    """The body both kernels share: ``x[offs_m, K-split] @ dequant(W)[K-split, offs_n]`` in fp32, K
    tiles interleaved over the ``SPLIT_K`` splits. ``ROW_BROADCAST`` (one row, ``BLOCK_M == 1``):
    a broadcast multiply-add instead of ``tl.dot`` (no tensor cores needed for one row)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K):
        k0 = kt * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = load_x_tile(x_ptr, perm_ptr, offs_m, offs_k, M, K, stride_xm, HAS_PERM)
        w = dequant_tile(w_ptr, s_ptr, z_ptr, g_ptr, offs_k, offs_n, k0, N, K, GROUP_SIZE, BITS, SYM, GROUP_PER_ROW)
        if ROW_BROADCAST:
            acc += tl.sum(tl.trans(x.to(tl.float32)) * w, axis=0, keep_dims=True)
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)
    return acc


@triton.jit
def store_tile(acc, b_ptr, y_ptr, offs_m, offs_n, pid_k, M, N, stride_ym,
               HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Add the bias (once, by the first split) and store the tile, or add it atomically into the
    fp32 buffer the splits share."""
    mask_n = offs_n < N
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0)
        acc += tl.where(pid_k == 0, bias, 0.0)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=mask)


def launch(kernel, name: str, kind: str, config_keys: tuple[str, ...], x: torch.Tensor, w: TritonPackedWeight,
           config: dict | None, grid, **constexprs) -> torch.Tensor:
    """The launcher both kernels share: checks, the per-GPU config (``configs.lookup(kind, M)``) unless
    given, the split-K choice, the output buffer, and the launch on ``grid(m, n, block_m, block_n,
    split_k)``; ``constexprs``: the kernel's own compile-time arguments."""
    from .. import configs

    x = check_launch(x, w, name)
    m, k, n = x.shape[0], w.in_features, w.out_features
    if config is None:
        config = configs.lookup(kind, m, device_name(x.device))
    check_config(config, config_keys, name)
    block_m, block_n = config["BLOCK_M"], config["BLOCK_N"]
    block_k = effective_block_k(config["BLOCK_K"], w)
    k_tiles = triton.cdiv(k, block_k)
    tiles_mn = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split_k = min(config["SPLIT_K"] or auto_split_k(tiles_mn, k_tiles, x.device), k_tiles)
    if split_k == 1:
        y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    else:
        y = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    extra = {key: config[key] for key in config_keys if key not in CONFIG_COMMON}
    kernel[grid(m, n, block_m, block_n, split_k)](
        x, w.qweight, w.scales,
        dummy(w) if w.zeros is None else w.zeros,
        dummy(w) if w.g_idx is None else w.g_idx,
        dummy(w) if w.perm is None else w.perm,
        dummy(w) if w.bias is None else w.bias,
        y,
        m, n, k, w.group_width, x.stride(0), y.stride(0),
        BITS=w.bits, SYM=w.zeros is None, GROUP_PER_ROW=w.g_idx is not None, HAS_PERM=w.perm is not None,
        HAS_BIAS=w.bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, **extra, **constexprs,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return y if split_k == 1 else y.to(x.dtype)


#: config keys every launch reads itself; the rest of a kernel's CONFIG_KEYS are its constexprs
CONFIG_COMMON = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "num_warps", "num_stages")
