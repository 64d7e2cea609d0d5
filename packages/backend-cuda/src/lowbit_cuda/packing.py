"""The Triton kernels' weight layout: a QuantizedWeight repacked once, at load, for the GPU.

Layout ``triton-kpack`` (``bits`` ∈ {2, 4, 8}; ``P = 32 // bits`` codes per int32)::

    qweight  int32   [ceil(K / P), N]  codes packed along K (the reduction dim), N contiguous
    scales   float16 [NG, N]           NG = K // group_size (1 per channel), N contiguous
    zeros    uint8   [NG, N]           integer zero points (asymmetric only; None when sym)
    perm     int32   [K] or None       act-order: kernel column k' reads input column perm[k']
    g_idx    int32   [K] or None       group of each (permuted) column, only when groups are uneven
    bias     float32 [N] or None

Bit layout: word ``qweight[j, n]`` holds the codes of rows ``k = P*j + i`` (``i = 0 .. P-1``) of
column ``n``, code ``i`` in bits ``[bits*i, bits*i + bits)`` (least significant first). Worked
example at 4 bits: the codes ``3, 15, 0, 7, 1, 2, 9, 4`` of ``k = 0..7`` pack to
``0x492170F3`` (nibbles read right to left: 3, F, 0, 7, 1, 2, 9, 4), stored as the signed int32
``1226928371``. At 8 bits codes ``1, 2, 3, 250`` pack to ``0xFA030201`` (int32 ``-100466175``).
When ``K`` is not a multiple of ``P`` the last word is padded with code 0; the kernels mask the
padded rows out through the activation load, so the padding never reaches the output.

Act-order (a non-trivial g_idx): the input columns are sorted once by group (stable), so each
group becomes one contiguous run of ``group_size`` columns; the kernels then gather ``x`` through
``perm`` as they load it (no extra pass over ``x`` on the hot path). If the sorted groups are not
all ``group_size`` long (a g_idx no GPTQ tool writes, but valid), the sorted g_idx is kept and the
kernels read each row's group from it.

Dequantization in the kernels (fp32, as ``QuantizedWeight.dequantize``)::

    W[n, k'] = (code[k', n] - zero[g(k'), n]) * scale[g(k'), n]     zero = 2**(bits-1) when sym
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit import Packer, QuantizedWeight, QuantScheme
from lowbit.errors import CheckpointError, UnsupportedSchemeError
from lowbit.packing import pack_bits, unpack_bits

SUPPORTED_BITS = (2, 4, 8)


@dataclass
class TritonPackedWeight:
    """One linear layer in the ``triton-kpack`` layout, on its device (see the module docstring)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    perm: torch.Tensor | None
    g_idx: torch.Tensor | None
    bias: torch.Tensor | None
    bits: int
    group_width: int  # input columns per group: K per channel (one group)
    in_features: int
    out_features: int

    @property
    def sym(self) -> bool:
        return self.zeros is None

    @property
    def device(self) -> torch.device:
        return self.qweight.device


def pack_codes(codes_kn: torch.Tensor, bits: int) -> torch.Tensor:
    """``uint8 [K, N]`` codes → ``int32 [ceil(K / P), N]`` words, ``P = 32 // bits`` rows per word
    (:func:`lowbit.packing.pack_bits` along K, the last word padded with code 0)."""
    p = 32 // bits
    k, n = codes_kn.shape
    padded = torch.zeros(n, -(-k // p) * p, dtype=torch.uint8)
    padded[:, :k] = codes_kn.t()
    return pack_bits(padded, bits).t().contiguous()


def unpack_codes(words: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``int32 [ceil(K / P), N]`` → ``uint8 [K, N]``."""
    return unpack_bits(words.t().contiguous(), bits, k).t().contiguous()


def check_scheme(scheme: QuantScheme) -> str | None:
    """None when the layout holds ``scheme``, else why not."""
    if scheme.bits not in SUPPORTED_BITS:
        return f"triton-kpack holds bits {SUPPORTED_BITS} (codes must tile a 32-bit word), got {scheme.bits}"
    return None


def pack(qw: QuantizedWeight, device: torch.device | str = "cpu") -> TritonPackedWeight:
    """Repack ``qw`` into the ``triton-kpack`` layout on ``device`` (done once, at load)."""
    reason = check_scheme(qw.scheme)
    if reason is not None:
        raise UnsupportedSchemeError(f"{reason}. Quantize with --bits 4 (or 2, 8), or use another kernel.")
    bits, k = qw.scheme.bits, qw.in_features
    codes = qw.codes
    perm = g_sorted = None
    if not qw.has_trivial_g_idx():
        g = qw.g_idx.long()
        order = torch.sort(g, stable=True).indices
        codes = codes[:, order]
        gs = qw.scheme.group_width(k)
        perm = order.to(torch.int32)
        if not torch.equal(g[order], torch.arange(k) // gs):
            g_sorted = g[order].to(torch.int32)
    sym_zero = 1 << (bits - 1)
    sym = qw.scheme.sym and bool((qw.zeros == sym_zero).all())
    dev = torch.device(device)
    return TritonPackedWeight(
        qweight=pack_codes(codes.t(), bits).contiguous().to(dev),
        scales=qw.scales.to(torch.float16).t().contiguous().to(dev),
        zeros=None if sym else qw.zeros.t().contiguous().to(dev),
        perm=None if perm is None else perm.to(dev),
        g_idx=None if g_sorted is None else g_sorted.to(dev),
        bias=None if qw.bias is None else qw.bias.to(torch.float32).contiguous().to(dev),
        bits=bits,
        group_width=qw.scheme.group_width(k),
        in_features=k,
        out_features=qw.out_features,
    )


def unpack(p: TritonPackedWeight, scheme: QuantScheme) -> QuantizedWeight:
    """The QuantizedWeight that ``p`` was packed from (codes, scales, zeros, g_idx, bias)."""
    k, n = p.in_features, p.out_features
    codes = unpack_codes(p.qweight.cpu(), p.bits, k).t()
    ng = p.scales.shape[0]
    zeros = (
        torch.full((n, ng), 1 << (p.bits - 1), dtype=torch.uint8) if p.zeros is None else p.zeros.cpu().t()
    )
    g_idx = None
    if p.perm is not None:
        perm = p.perm.cpu().long()
        g_sorted = (torch.arange(k) // p.group_width) if p.g_idx is None else p.g_idx.cpu().long()
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(k)
        codes = codes[:, inv]
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[perm] = g_sorted.to(torch.int32)
    bias = None if p.bias is None else p.bias.cpu()
    return QuantizedWeight(codes.contiguous(), p.scales.cpu().t().contiguous(), zeros.contiguous(), scheme, g_idx, bias)


class TritonPacker(Packer):
    """``triton-kpack`` as a registered Packer: the kernels' layout as named tensors."""

    name = "triton-kpack"
    supported_bits = SUPPORTED_BITS

    def pack(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        p = pack(qw)
        out = {"qweight": p.qweight, "scales": p.scales}
        for key in ("zeros", "perm", "g_idx", "bias"):
            if getattr(p, key) is not None:
                out[key] = getattr(p, key)
        return out

    def unpack(
        self, tensors: dict[str, torch.Tensor], scheme: QuantScheme, in_features: int, out_features: int
    ) -> QuantizedWeight:
        if "qweight" not in tensors or "scales" not in tensors:
            raise CheckpointError(
                f"triton-kpack needs tensors qweight and scales, got {sorted(tensors)}; "
                "pass the dict TritonPacker.pack returned."
            )
        words = -(-in_features // (32 // scheme.bits))
        if list(tensors["qweight"].shape) != [words, out_features]:
            raise CheckpointError(
                f"triton-kpack qweight shape {list(tensors['qweight'].shape)} != [{words}, {out_features}] "
                f"for {scheme.describe()} {out_features}x{in_features}; check the scheme and shape passed."
            )
        return unpack(packed_weight(tensors, scheme, in_features, out_features), scheme)


def packed_weight(tensors: dict[str, torch.Tensor], scheme: QuantScheme, in_features: int, out_features: int,
                  device: torch.device | str | None = None) -> TritonPackedWeight:
    """The kernels' :class:`TritonPackedWeight` from a ``triton-kpack`` packer's named tensors (on ``device``)."""
    to = (lambda t: t) if device is None else (lambda t: t.to(torch.device(device)))
    opt = {key: None if tensors.get(key) is None else to(tensors[key]) for key in ("zeros", "perm", "g_idx", "bias")}
    return TritonPackedWeight(qweight=to(tensors["qweight"]), scales=to(tensors["scales"]), **opt, bits=scheme.bits,
                              group_width=scheme.group_width(in_features), in_features=in_features, out_features=out_features)
