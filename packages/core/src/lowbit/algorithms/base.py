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
from ..recipe import Option
from ..scheme import QuantScheme
from .context import LayerContext, LinearGroup, Replay

__all__ = ["OBSERVER", "LayerContext", "LinearGroup", "Option", "Quantizer", "Replay", "check_observer"]


class Quantizer:
    """Base class of recipe steps; register with ``lowbit_register_quantizers``.

    :param scheme: the target scheme.
    :param options: step-specific options (e.g. ``damp`` for GPTQ), declared as :class:`Option` s
        in the class's ``options`` (the CLI makes a flag of each); unknown ones are an error.
    """

    name: ClassVar[str] = ""
    quantizes: ClassVar[bool] = True
    supported_bits: ClassVar[tuple[int, ...]] = (2, 3, 4, 8)
    supports_act_order: ClassVar[bool] = False
    needs_calibration: ClassVar[bool] = False
    #: True when, run first, the step streams the untouched float layer with ``reference=True``
    #: (:meth:`LayerContext.stream`), so the pass need not run a forward for the error report
    records_reference: bool = False
    #: True when the step needs the float model's own outputs of this layer on every calibration batch
    #: (``ctx.float_outputs``): the untouched float layer run by the pass, before any step, on the
    #: float model's activations (a second activation stream the pass carries beside the quantized
    #: one), so a step can aim at what the float model computes rather than at the float layer on
    #: inputs the earlier quantized layers already changed
    needs_float_outputs: ClassVar[bool] = False
    options: ClassVar[tuple[Option, ...]] = ()
    description: ClassVar[str] = ""

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Each option's default value."""
        return {o.name: o.default for o in cls.options}

    def __init__(self, scheme: QuantScheme, **options: Any):
        defaults = self.defaults()
        unknown = set(options) - set(defaults)
        if unknown:
            raise UnsupportedSchemeError(
                f"{self.name} has no option(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(sorted(defaults)) or 'none'}."
            )
        self.scheme = scheme
        self.opts = {**defaults, **options}
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


#: the range observer rtn and gptq share (one flag, reaching both)
OBSERVER = Option("observer", "minmax", choices=OBSERVERS, flag="--observer",
                  help="how each group's range is chosen: minmax, its min and max; mse, the range shrunk by up to "
                  "20%% that minimizes the group's own weight error (no data needed; after AWQ's clipping with awq)")


def check_observer(step: Quantizer) -> None:
    """A quantizing step's ``observer`` option must name one of :data:`lowbit.primitives.OBSERVERS`."""
    if step.opts["observer"] not in OBSERVERS:
        raise UnsupportedSchemeError(f"{step.name} observer must be one of {', '.join(OBSERVERS)}, "
                                     f"got {step.opts['observer']!r}; pass --observer minmax or --observer mse.")
