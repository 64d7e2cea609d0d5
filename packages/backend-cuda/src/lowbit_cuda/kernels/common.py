"""What the GEMM and the GEMV kernels share: the in-register dequantization of one weight tile,
the activation-tile load (through the act-order permutation), and the launchers' checks."""

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
    """BLOCK_K clamped to the group size, so a tile never straddles two groups."""
    if w.g_idx is None and w.group_size != -1:
        return min(block_k, w.group_size)
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
