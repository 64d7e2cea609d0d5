"""The Quantizer interface (one recipe step) and the LayerContext steps work on.

A recipe is a list of steps run on each decoder layer in turn. A *transform* step (AWQ) changes
the float layer (scales folded into the previous op, clipped weights); a *quantizing* step (RTN,
GPTQ) turns each linear into a QuantizedWeight with ``ctx.set_quantized``, which also writes the
fake-quantized weight back into the layer so later groups and the next layer see quantized
outputs. The last step of a recipe must quantize.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import UnsupportedSchemeError
from ..qweight import QuantizedWeight
from ..scheme import QuantScheme


@dataclass
class LinearGroup:
    """Linears that read the same input, and the op that produces it.

    :param prev: path (inside the layer) of the op whose output feeds ``linears`` (a norm or a
        linear), or None when no op can absorb a per-channel scale.
    :param linears: paths inside the layer, e.g. ``["self_attn.q_proj", "self_attn.k_proj"]``.
    :param inspect: path of the module whose output measures the group's error (AWQ), e.g.
        ``"self_attn"``; None means the linears themselves.
    """

    prev: str | None
    linears: list[str]
    inspect: str | None = None


@dataclass
class LayerContext:
    """One decoder layer during the pass.

    :param inputs: the layer's calibration inputs, a list of ``[batch, seqlen, hidden]`` tensors.
    :param kwargs: per input batch, the keyword arguments the model passed to the layer
        (position embeddings, attention mask, ...).
    """

    index: int
    prefix: str
    layer: nn.Module
    groups: list[LinearGroup]
    scheme: QuantScheme
    inputs: list[torch.Tensor]
    kwargs: list[dict[str, Any]]
    qweights: dict[str, QuantizedWeight] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    compute_dtype: torch.dtype = torch.float32

    def module(self, path: str) -> nn.Module:
        return self.layer.get_submodule(path)

    def linear_paths(self) -> list[str]:
        return [p for g in self.groups for p in g.linears]

    def unquantized(self) -> list[str]:
        return [p for p in self.linear_paths() if self.prefix + p not in self.qweights]

    def set_quantized(self, path: str, qw: QuantizedWeight) -> None:
        """Record ``qw`` for the linear at ``path`` and put its dequantized weight in the layer."""
        lin = self.module(path)
        with torch.no_grad():
            lin.weight.copy_(qw.dequantize(lin.weight.dtype))
        self.qweights[self.prefix + path] = qw

    def autocast(self):
        """Matmuls in ``compute_dtype`` (bf16 → AMX on Xeon) when it is not float32."""
        enabled = self.compute_dtype != torch.float32
        return torch.autocast("cpu", dtype=self.compute_dtype, enabled=enabled)

    @torch.no_grad()
    def forward(self, batches: int | None = None) -> list[torch.Tensor]:
        """The layer's outputs over every input batch, or the first ``batches`` (with the layer as it is now)."""
        outs = []
        with self.autocast():
            for x, kw in list(zip(self.inputs, self.kwargs))[:batches]:
                out = self.layer(x, **kw)
                out = out[0] if isinstance(out, tuple) else out
                outs.append(out.to(x.dtype))
        return outs

    @torch.no_grad()
    def capture_inputs(self, paths: list[str], stop_after: str | None = None) -> dict[str, list[torch.Tensor]]:
        """Run the layer over every batch and collect the inputs reaching each module in ``paths``
        (a list of ``[batch, seqlen, in_features]`` per module)."""
        got: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
        handles = []
        for p in paths:
            def hook(_mod, args, p=p):
                got[p].append(args[0].detach())
            handles.append(self.module(p).register_forward_pre_hook(hook))
        try:
            self.forward()
        finally:
            for h in handles:
                h.remove()
        return got


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
