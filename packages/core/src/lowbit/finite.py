"""NaN and infinity in what lowbit computes from: refused with one line naming where they are.

A quantizer fed a NaN weight or activation still writes a checkpoint (of NaN scales, or codes fitted
to garbage) and a perplexity over NaN logits is NaN: both look like results. So every float tensor of
a source model is checked as it is read, every calibration activation as the layer-by-layer pass
produces it, and every perplexity window's loss. :func:`check_finite` is the one check; the others
wrap it for a place that reads or computes tensors.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .errors import CalibrationError, LowbitError, ModelLoadError

#: elements per piece when a tensor is scanned piece by piece (its boolean mask stays this small)
_PIECE = 1 << 22


def is_finite(t: torch.Tensor) -> bool:
    """True when ``t`` holds no NaN or infinity (always for integer tensors). Cheap: one sum, since
    NaN and ±Inf propagate through a sum, a finite sum proves every element finite; only when the
    sum is not finite (a NaN, or a sum that overflowed, as float16 sums do) is the tensor scanned,
    piece by piece, so no temporary grows with the tensor."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if bool(torch.isfinite(t.sum())):
        return True
    return _scan(t)


def _scan(t: torch.Tensor) -> bool:
    if t.numel() <= _PIECE:
        return bool(torch.isfinite(t).all())
    if t.is_contiguous():
        return all(bool(torch.isfinite(p).all()) for p in t.view(-1).split(_PIECE))
    return all(_scan(row) for row in t)  # a strided view: row by row, never a contiguous copy


def check_finite(t: torch.Tensor, what: str, fix: str, error: type[LowbitError] = LowbitError) -> torch.Tensor:
    """``t`` itself when it is finite, else ``error`` saying ``what`` holds NaN or infinity and ``fix``."""
    if not is_finite(t):
        raise error(f"{what} holds NaN or infinite values; lowbit does not compute from them. {fix}")
    return t


SOURCE_FIX = "Fix or re-download the model (its weights are damaged or were saved after a diverged training run)."


def check_source_tensor(t: torch.Tensor, name: str, where: str) -> torch.Tensor:
    """A source model's tensor ``name`` read from ``where``, checked."""
    return check_finite(t, f"the model's tensor {name} (in {where})", SOURCE_FIX, ModelLoadError)


def checked_chunks(chunks: Iterator[torch.Tensor], name: str, where: str) -> Iterator[torch.Tensor]:
    """The row chunks of a source tensor written without holding it whole, each checked as it comes."""
    for c in chunks:
        yield check_source_tensor(c, name, where)


def check_activation(t, where: str) -> None:
    """A calibration activation (``where``: the layer and the point in it) checked, when it is a tensor."""
    if isinstance(t, torch.Tensor):
        check_finite(t, f"the calibration activations at {where}",
                     "The model overflows or is damaged on this calibration text: check its weights, and use "
                     "--compute-dtype fp32 if a 16-bit compute dtype overflows.", CalibrationError)
