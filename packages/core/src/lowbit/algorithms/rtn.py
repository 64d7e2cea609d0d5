"""RTN: round every weight to the nearest code, per group (no calibration)."""

from __future__ import annotations

import torch

from ..primitives import quantize
from ..scheme import QuantScheme
from .base import OBSERVER, LayerContext, Quantizer, check_observer


class RTN(Quantizer):
    name = "rtn"
    quantizes = True
    description = "round to nearest, per group; range from min/max or an error search (observer)"
    options = (OBSERVER,)

    def check(self, scheme: QuantScheme) -> None:
        super().check(scheme)
        check_observer(self)

    @torch.no_grad()
    def apply(self, ctx: LayerContext) -> None:
        for path in ctx.unquantized():
            lin = ctx.module(path)
            bias = None if lin.bias is None else lin.bias.detach().clone()
            ctx.set_quantized(path, quantize(lin.weight.detach(), self.scheme, bias=bias, observer=self.opts["observer"]))
