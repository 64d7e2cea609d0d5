"""RTN: round every weight to the nearest code, per group (no calibration)."""

from __future__ import annotations

import torch

from ..primitives import quantize
from .base import LayerContext, Quantizer


class RTN(Quantizer):
    name = "rtn"
    quantizes = True
    description = "round to nearest, min/max per group"

    @torch.no_grad()
    def apply(self, ctx: LayerContext) -> None:
        for path in ctx.unquantized():
            lin = ctx.module(path)
            bias = None if lin.bias is None else lin.bias.detach().clone()
            ctx.set_quantized(path, quantize(lin.weight.detach(), self.scheme, bias=bias))
