"""Quantization primitives: choose qparams, quantize, dequantize (pure torch).

======================  ===================================================================
asymmetric (sym=False)  ``xmin = min(w_group, 0)``, ``xmax = max(w_group, 0)``;
                        ``s = (xmax - xmin) / maxq``; ``z = round(-xmin / s)``
symmetric  (sym=True)   ``s = 2 * absmax / maxq`` (GPTQ's convention); ``z = 2**(bits-1)``
both                    ``q = clamp(round(w / s) + z, 0, maxq)``; ``w ≈ s * (q - z)``
======================  ===================================================================

Scales are stored in float16 (every consumer format does). RTN (:func:`quantize`) quantizes on the
exact grid, the scale before fp16 rounding (:func:`exact_qparams`): its zero point and codes come from
that scale, so a weight exactly halfway between two levels rounds half to even, and only then is the
scale rounded for storage. Codes chosen against the fp16-rounded scale instead break every such tie of
a group the same way (the way the group's scale happened to round), a correlated error; the demo model's
weights (dequantized Q4_1) have many exact ties. Against the exact scale a code differs from the nearest
level of the stored grid only within ``maxq · 2⁻¹¹`` of a step of a tie. Chosen on the validation text
(RTN W4 g64 on the demo model, 40 windows): 21.757 with zero and codes from the fp16 scale, 21.697 from
the exact scale, 21.696 with fp32 scales kept (benchmarks/quality/RESULTS.md). GPTQ quantizes on the
stored grid (:func:`choose_qparams`: zero point and codes from the fp16 scale), because its error
feedback must compensate the values that are stored. Rounding is round-half-to-even (``torch.round``).
The observed range is the group's min and max, or with ``observer="mse"`` that range shrunk to the
factor that minimizes the group's own error (:func:`mse_range`).
"""

from __future__ import annotations

import torch

from .qweight import QuantizedWeight
from .scheme import QuantScheme

_MIN_SCALE = 1e-5  # fp16-representable floor: a group of zeros gets scale 1e-5, codes == zero


def _grouped(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    n, k = w.shape
    gs = scheme.group_width(k)
    return w.reshape(n, k // gs, gs)


#: how a group's range is chosen: its min and max, or the range that minimizes its error (:func:`mse_range`)
OBSERVERS = ("minmax", "mse")


def choose_qparams(
    w: torch.Tensor, scheme: QuantScheme, *, xmin: torch.Tensor | None = None, xmax: torch.Tensor | None = None,
    observer: str = "minmax",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales (fp16) and zeros (uint8), each ``[N, NG]``, for the ``[N, K]`` float weight ``w``: the
    stored grid, the zero point being the best integer for the fp16 scale (GPTQ quantizes on this grid).

    ``xmin``/``xmax`` (``[N, NG]``) override the observed range (used by clipping searches); otherwise
    ``observer`` (one of :data:`OBSERVERS`) chooses it.
    """
    exact, lo = _exact_scales(w, scheme, xmin, xmax, observer)
    scales = exact.half()
    return scales, _zeros(lo, scales.float(), scheme)


def exact_qparams(w: torch.Tensor, scheme: QuantScheme, *, xmin: torch.Tensor | None = None,
                  xmax: torch.Tensor | None = None, observer: str = "minmax") -> tuple[torch.Tensor, torch.Tensor]:
    """The exact grid RTN quantizes on (module docstring): fp32 scales before fp16 rounding, and the
    zeros (uint8) for them. Arguments as :func:`choose_qparams`; ``scales.half()`` is what is stored."""
    exact, lo = _exact_scales(w, scheme, xmin, xmax, observer)
    return exact, _zeros(lo, exact, scheme)


def _exact_scales(w, scheme, xmin, xmax, observer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 scales ``[N, NG]`` of the observed ranges, and (asymmetric) the ranges' lower ends."""
    if observer not in OBSERVERS:
        raise ValueError(f"observer must be one of {', '.join(OBSERVERS)}, got {observer!r}.")
    if observer == "mse" and xmin is None and xmax is None:
        xmin, xmax = mse_range(w, scheme)
    wg = _grouped(w.float(), scheme)
    lo = wg.amin(dim=-1) if xmin is None else xmin.float()
    hi = wg.amax(dim=-1) if xmax is None else xmax.float()
    if scheme.sym:
        return (2 * torch.maximum(lo.abs(), hi.abs()) / scheme.maxq).clamp(min=_MIN_SCALE), None
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    return ((hi - lo) / scheme.maxq).clamp(min=_MIN_SCALE), lo


def _zeros(lo: torch.Tensor | None, scales: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    if lo is None:  # symmetric: the middle code
        return torch.full(scales.shape, 1 << (scheme.bits - 1), dtype=torch.uint8, device=scales.device)
    return torch.round(-lo / scales).clamp(0, scheme.maxq).to(torch.uint8)


def mse_range(w: torch.Tensor, scheme: QuantScheme, *, grid: int = 100, maxshrink: float = 0.2,
              norm: float = 2.4) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group clipping range that minimizes the weight's own quantization error (no calibration data).

    Each group's observed range ``[min, max]`` is shrunk to ``[p·min, p·max]`` for
    ``p = 1, 1 - 1/grid, …, 1 - maxshrink``, and the ``p`` with the lowest ``Σ |w - ŵ|^norm`` over the group
    wins (ties keep the wider range). This is the "MSE" observer of GPTQ's reference quantizer and of
    llm-compressor (``norm`` 2.4, ``grid`` 100; llm-compressor shrinks by at most 0.2, GPTQ's reference
    by 0.8). The error is measured as :func:`quantize` would quantize, with the fp16 scales stored. Returns ``(xmin,
    xmax)``, each ``[N, NG]``, for ``choose_qparams(w, scheme, xmin=…, xmax=…)``.
    """
    if grid < 1 or not 0 <= maxshrink < 1 or norm <= 0:
        raise ValueError(f"mse_range needs grid >= 1, 0 <= maxshrink < 1 and norm > 0; got {grid}, {maxshrink}, {norm}.")
    wg = _grouped(w.float(), scheme)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    best_lo, best_hi = lo.clone(), hi.clone()
    best_err = torch.full_like(lo, float("inf"))
    for i in range(int(round(maxshrink * grid)) + 1):
        p = 1 - i / grid
        exact, zeros = exact_qparams(w, scheme, xmin=lo * p, xmax=hi * p)
        z = zeros.float()[..., None]
        q = torch.clamp(torch.round(wg / exact[..., None]) + z, 0, scheme.maxq)  # as quantize() chooses codes
        err = ((q - z) * exact.half().float()[..., None] - wg).abs_().pow_(norm).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo * p, best_lo)
        best_hi = torch.where(better, hi * p, best_hi)
    return best_lo, best_hi


def quantize_codes(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, scheme: QuantScheme, g_idx: torch.Tensor | None = None
) -> torch.Tensor:
    """``uint8 [N, K]`` codes of ``w`` against given per-group scales and zeros."""
    n, k = w.shape
    if g_idx is None and k == scales.shape[1] * scheme.group_width(k):
        # whole groups by broadcasting: one [N, K] float temporary, not four
        wg = w.float().reshape(n, scales.shape[1], -1)
        q = (wg / scales.float()[..., None]).round_().add_(zeros.float()[..., None]).clamp_(0, scheme.maxq)
        return q.to(torch.uint8).reshape(n, k)
    gi = torch.arange(k, device=w.device) // scheme.group_width(k) if g_idx is None else g_idx.long()
    s = scales.float()[:, gi]
    z = zeros.float()[:, gi]
    return torch.clamp(torch.round(w.float() / s) + z, 0, scheme.maxq).to(torch.uint8)


def quantize(w: torch.Tensor, scheme: QuantScheme, bias: torch.Tensor | None = None,
             observer: str = "minmax") -> QuantizedWeight:
    """Round-to-nearest quantization of a float ``[N, K]`` weight (no act-order); ``observer``: see
    :func:`choose_qparams`."""
    scheme.check_shape(w.shape[1])
    exact, zeros = exact_qparams(w, scheme, observer=observer)
    codes = quantize_codes(w, exact, zeros, scheme)  # against the exact scale: see the module docstring
    scales = exact.half()
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
