"""The Quantizer interface: one recipe step (the LayerContext it works on is in context.py).

A recipe is a list of steps run on each decoder layer in turn. A *transform* step (AWQ) changes
the float layer (scales folded into the previous op, clipped weights); a *quantizing* step (RTN,
GPTQ) turns each linear into a QuantizedWeight with ``ctx.set_quantized``, which also writes the
fake-quantized weight back into the layer so later groups and the next layer see quantized
outputs. The last step of a recipe must quantize.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from ..errors import UnsupportedSchemeError
from ..primitives import OBSERVERS
from ..scheme import QuantScheme
from .context import LayerContext, LinearGroup, Replay

__all__ = ["LayerContext", "LinearGroup", "Quantizer", "Replay", "check_observer"]


class Quantizer:
    """Base class of recipe steps; register with ``lowbit_register_quantizers``.

    :param scheme: the target scheme.
    :param options: step-specific options (e.g. ``damp`` for GPTQ); unknown ones are an error.
    """

    name: ClassVar[str] = ""
    quantizes: ClassVar[bool] = True
    supported_bits: ClassVar[tuple[int, ...]] = (2, 3, 4, 8)
    supports_act_order: ClassVar[bool] = False
    needs_calibration: ClassVar[bool] = False
    #: True when, run first, the step streams the untouched float layer with ``reference=True``
    #: (:meth:`LayerContext.stream`), so the pass need not run a forward for the error report
    records_reference: bool = False
    options: ClassVar[dict[str, Any]] = {}
    description: ClassVar[str] = ""

    def __init__(self, scheme: QuantScheme, **options: Any):
        unknown = set(options) - set(self.options)
        if unknown:
            raise UnsupportedSchemeError(
                f"{self.name} has no option(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(sorted(self.options)) or 'none'}."
            )
        self.scheme = scheme
        self.opts = {**self.options, **options}
        self.check(scheme)

    def check(self, scheme: QuantScheme) -> None:
        """Raise UnsupportedSchemeError, before any work, if this step cannot do ``scheme``."""
        if scheme.bits not in self.supported_bits:
            raise UnsupportedSchemeError(
                f"{self.name} supports bits {', '.join(map(str, self.supported_bits))}, got {scheme.bits}."
            )
        if scheme.act_order and self.quantizes and not self.supports_act_order:
            raise UnsupportedSchemeError(
                f"{self.name} cannot use act-order; act-order needs --method gptq (or awq+gptq)."
            )

    def prepare(self, model: nn.Module, adapter: Any) -> None:
        """Called once before the pass (e.g. to validate a file of saved results against the model)."""

    def apply(self, ctx: LayerContext) -> None:
        """Transform or quantize one decoder layer."""
        raise NotImplementedError

    def finish(self) -> None:
        """Called once after the last layer (e.g. to write a dump of search results)."""


def check_observer(step: Quantizer) -> None:
    """A quantizing step's ``observer`` option must name one of :data:`lowbit.primitives.OBSERVERS`."""
    if step.opts["observer"] not in OBSERVERS:
        raise UnsupportedSchemeError(f"{step.name} observer must be one of {', '.join(OBSERVERS)}, "
                                     f"got {step.opts['observer']!r}; pass --observer minmax or --observer mse.")
