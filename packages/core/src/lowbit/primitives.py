"""Quantization primitives: choose qparams, quantize, dequantize (pure torch).

======================  ===================================================================
asymmetric (sym=False)  ``xmin = min(w_group, 0)``, ``xmax = max(w_group, 0)``;
                        ``s = (xmax - xmin) / maxq``; ``z = round(-xmin / s)``
symmetric  (sym=True)   ``s = 2 * absmax / maxq`` (GPTQ's convention); ``z = 2**(bits-1)``
both                    ``q = clamp(round(w / s) + z, 0, maxq)``; ``w ≈ s * (q - z)``
======================  ===================================================================

Scales are rounded to float16 *before* codes are computed, so the stored scales are exactly the
ones the codes were chosen against. Rounding is round-half-to-even (``torch.round``).
"""

from __future__ import annotations

import torch

from .qweight import QuantizedWeight
from .scheme import QuantScheme

_MIN_SCALE = 1e-5  # fp16-representable floor: a group of zeros gets scale 1e-5, codes == zero


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    return w.reshape(n, k // gs, gs)


def choose_qparams(
    w: torch.Tensor, scheme: QuantScheme, *, xmin: torch.Tensor | None = None, xmax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales (fp16) and zeros (uint8), each ``[N, NG]``, for the ``[N, K]`` float weight ``w``.

    ``xmin``/``xmax`` (``[N, NG]``) override the observed range (used by clipping searches).
    """
    wg = _grouped(w.float(), scheme.group_size)
    lo = wg.amin(dim=-1) if xmin is None else xmin.float()
    hi = wg.amax(dim=-1) if xmax is None else xmax.float()
    if scheme.sym:
        absmax = torch.maximum(lo.abs(), hi.abs())
        scales = (2 * absmax / scheme.maxq).clamp(min=_MIN_SCALE).half()
        zeros = torch.full_like(scales, 1 << (scheme.bits - 1), dtype=torch.uint8)
    else:
        lo = lo.clamp(max=0)
        hi = hi.clamp(min=0)
        scales = ((hi - lo) / scheme.maxq).clamp(min=_MIN_SCALE).half()
        zeros = torch.round(-lo / scales.float()).clamp(0, scheme.maxq).to(torch.uint8)
    return scales, zeros


def quantize_codes(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, scheme: QuantScheme, g_idx: torch.Tensor | None = None
) -> torch.Tensor:
    """``uint8 [N, K]`` codes of ``w`` against given per-group scales and zeros."""
    k = w.shape[1]
    if g_idx is None:
        gs = k if scheme.group_size == -1 else scheme.group_size
        gi = torch.arange(k, device=w.device) // gs
    else:
        gi = g_idx.long()
    s = scales.float()[:, gi]
    z = zeros.float()[:, gi]
    return torch.clamp(torch.round(w.float() / s) + z, 0, scheme.maxq).to(torch.uint8)


def quantize(w: torch.Tensor, scheme: QuantScheme, bias: torch.Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest quantization of a float ``[N, K]`` weight (no act-order)."""
    scheme.check_shape(w.shape[1])
    scales, zeros = choose_qparams(w, scheme)
    codes = quantize_codes(w, scales, zeros, scheme)
    return QuantizedWeight(codes=codes, scales=scales, zeros=zeros, scheme=scheme, bias=bias)


def fake_quantize(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """``dequantize(quantize(w))`` in ``w``'s dtype."""
    return quantize(w, scheme).dequantize(w.dtype)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return qw.dequantize(dtype)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    ref = reference.float()
    noise = (ref - approx.float()).pow(2).mean()
    return float(10 * torch.log10(ref.pow(2).mean() / noise.clamp(min=1e-30)))
