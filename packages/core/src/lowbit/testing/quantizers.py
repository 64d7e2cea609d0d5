"""Quantizer conformance: a recipe step quantizes a real decoder layer, and beats RTN at it.

Subclass and set ``quantizer``::

    from lowbit.testing import QuantizerConformance

    class TestMyStep(QuantizerConformance):
        quantizer = MyStep
        options = {"damp": 0.01}          # options to construct the step with, if any

A transform step (``quantizes = False``, like AWQ) is followed by ``follow_with`` (RTN by
default) so the layer ends up quantized. The layer is decoder layer 0 of a tiny seeded llama
whose norm weights carry a few large channels (the activation outliers real LLMs have), fed
real calibration text through its own embeddings. Checked:

- every linear of the layer is quantized, to a valid QuantizedWeight of the asked scheme, and
  the layer's weights are the dequantized ones (the ``ctx.set_quantized`` contract);
- the same inputs give the same codes twice (determinism);
- unknown options and unsupported bits are refused with a LowbitError before any work;
- with ``beats_rtn`` (default True), the layer's output error on HELD-OUT tokens is lower than
  RTN's by at least ``margin`` (relative): ``err < (1 - margin) * err_rtn``, for every scheme in
  ``schemes``. RTN itself sets ``beats_rtn = False``.
"""

from __future__ import annotations

import copy
import functools
from typing import Any, ClassVar

import pytest
import torch

from ..algorithms.base import LayerContext, Quantizer
from ..errors import LowbitError
from ..recipe import Option
from ..scheme import SUPPORTED_BITS, QuantScheme

__all__ = ["QuantizerConformance", "LayerFixture", "layer_fixture"]


class LayerFixture:
    """Decoder layer 0 of a tiny llama, with calibration and held-out inputs to it."""

    def __init__(self, seed: int, nsamples: int, seqlen: int, outliers: float):
        from ..calibration import BUILTIN, builtin_text, samples
        from ..models import adapter_for
        from ..pipeline import capture_layer_inputs
        from ..plugins import registry
        from .models import tiny_llama, tiny_tokenizer

        self.model = tiny_llama(seed)
        self.adapter = adapter_for(self.model.config, registry("architectures"))
        roles = self.adapter.layer_roles(self.model.config)
        gen = torch.Generator().manual_seed(seed)
        hidden = self.model.config.hidden_size
        with torch.no_grad():  # a few outlier channels, as in trained LLMs
            for layer in self.adapter.layers(self.model):
                for norm in (layer.get_submodule(roles["attn_norm"]), layer.get_submodule(roles["mlp_norm"])):
                    w = torch.ones(hidden) + 0.1 * torch.randn(hidden, generator=gen)
                    w[torch.randperm(hidden, generator=gen)[: max(1, hidden // 32)]] *= outliers
                    norm.weight.copy_(w)
        tok = tiny_tokenizer(self.model.config.vocab_size)
        ids = samples(tok, builtin_text(BUILTIN["wikitext2"])[:200_000], 2 * nsamples, seqlen)
        inputs, kwargs = capture_layer_inputs(self.model, self.adapter, ids, batch_size=max(1, nsamples // 2))
        half = len(inputs) // 2
        self.calib = (inputs[:half], kwargs[:half])
        self.heldout = (inputs[half:], kwargs[half:])

    def context(self, scheme: QuantScheme, data: str = "calib") -> LayerContext:
        """A fresh copy of layer 0 in a LayerContext over ``data`` ("calib" or "heldout")."""
        layer = copy.deepcopy(self.adapter.layers(self.model)[0])
        inputs, kwargs = self.calib if data == "calib" else self.heldout
        return LayerContext(0, self.adapter.layer_prefix(0), layer, self.adapter.groups(layer), scheme,
                            inputs, kwargs, qweights={}, compute_dtype=torch.float32,
                            blocks=self.adapter.blocks(layer))


@functools.lru_cache(maxsize=2)
def layer_fixture(seed: int = 0, nsamples: int = 16, seqlen: int = 64, outliers: float = 8.0) -> LayerFixture:
    return LayerFixture(seed, nsamples, seqlen, outliers)


def _ids(scheme: QuantScheme) -> str:
    return scheme.describe().replace(" ", "-")


def output_error(fix: LayerFixture, ctx: LayerContext) -> float:
    """Relative L2 error of the quantized layer's output vs the float layer's, on held-out inputs."""
    ref = fix.context(ctx.scheme, "heldout").forward()
    held = fix.context(ctx.scheme, "heldout")
    held.layer = ctx.layer
    out = held.forward()
    num = sum(float((a - b).pow(2).sum()) for a, b in zip(ref, out))
    den = sum(float(a.pow(2).sum()) for a in ref)
    return (num / den) ** 0.5


DEFAULT_SCHEMES = (QuantScheme(4, 64), QuantScheme(3, 32), QuantScheme(4, -1))


class QuantizerConformance:
    quantizer: ClassVar[type[Quantizer]]
    options: ClassVar[dict[str, Any]] = {}
    schemes: ClassVar[tuple[QuantScheme, ...]] = DEFAULT_SCHEMES
    #: the quantizing step run after a transform step (quantizes = False)
    follow_with: ClassVar[str] = "rtn"
    #: must beat RTN's held-out layer output error (RTN itself opts out)
    beats_rtn: ClassVar[bool] = True
    #: required relative improvement over RTN: err < (1 - margin) * err_rtn
    margin: ClassVar[float] = 0.0
    seed: ClassVar[int] = 0

    # ---------------------------------------------------------------- helpers
    def fixture(self) -> LayerFixture:
        return layer_fixture(self.seed)

    def steps(self, scheme: QuantScheme) -> list[Quantizer]:
        from ..plugins import registry

        steps = [self.quantizer(scheme, **self.options)]
        if not self.quantizer.quantizes:
            steps.append(registry("quantizers").get(self.follow_with)(scheme))
        return steps

    def run_steps(self, scheme: QuantScheme) -> LayerContext:
        fix = self.fixture()
        ctx = fix.context(scheme)
        steps = self.steps(scheme)
        for s in steps:
            s.prepare(fix.model, fix.adapter)
        for s in steps:
            s.apply(ctx)
        for s in steps:
            s.finish()
        return ctx

    def rtn_error(self, scheme: QuantScheme) -> float:
        from ..algorithms.rtn import RTN

        fix = self.fixture()
        ctx = fix.context(scheme)
        RTN(scheme).apply(ctx)
        return output_error(fix, ctx)

    def _supported_or_skip(self, scheme: QuantScheme) -> None:
        if scheme.bits not in self.quantizer.supported_bits:
            pytest.skip(f"{self.quantizer.name} supports bits {self.quantizer.supported_bits}")
        if scheme.act_order and not self.quantizer.supports_act_order:
            pytest.skip(f"{self.quantizer.name} has no act-order")

    # ---------------------------------------------------------------- tests
    def test_declares_itself(self):
        q = self.quantizer
        assert q.name, "a quantizer needs a name (what --method and recipes refer to)"
        assert isinstance(q.quantizes, bool) and set(q.supported_bits) <= set(SUPPORTED_BITS)
        assert all(isinstance(o, Option) and o.name and o.help for o in q.options), "options are typed Options"
        assert len({o.name for o in q.options}) == len(q.options), "option names are unique"

    def test_refuses_unknown_options_and_bits(self):
        scheme = QuantScheme(4, 64)
        with pytest.raises(LowbitError):
            self.quantizer(scheme, **self.options, no_such_option_xyz=1)
        for bits in SUPPORTED_BITS:
            if bits not in self.quantizer.supported_bits:
                with pytest.raises(LowbitError):
                    self.quantizer(QuantScheme(bits, 64), **self.options)

    @pytest.mark.parametrize("index", range(len(DEFAULT_SCHEMES)))
    def test_quantizes_every_linear(self, index):
        if index >= len(self.schemes):
            pytest.skip("fewer schemes in this suite")
        scheme = self.schemes[index]
        self._supported_or_skip(scheme)
        ctx = self.run_steps(scheme)
        assert not ctx.unquantized(), f"left unquantized: {ctx.unquantized()}"
        assert sorted(ctx.qweights) == sorted(ctx.prefix + p for p in ctx.linear_paths())
        for path in ctx.linear_paths():
            qw = ctx.qweights[ctx.prefix + path]
            qw.validate()
            assert (qw.scheme.bits, qw.scheme.group_size, qw.scheme.sym) == (scheme.bits, scheme.group_size, scheme.sym)
            lin = ctx.module(path)
            assert (qw.out_features, qw.in_features) == tuple(lin.weight.shape)
            assert torch.equal(lin.weight, qw.dequantize(lin.weight.dtype)), f"{path}: layer weight != dequantized"

    def test_deterministic(self):
        scheme = self.schemes[0]
        self._supported_or_skip(scheme)
        a, b = self.run_steps(scheme), self.run_steps(scheme)
        for mod, qw in a.qweights.items():
            assert qw.equal(b.qweights[mod]), f"{mod} differs between two runs on the same inputs"

    @pytest.mark.parametrize("index", range(len(DEFAULT_SCHEMES)))
    def test_beats_rtn(self, index):
        if not self.beats_rtn:
            pytest.skip(f"{self.quantizer.name} opts out of the beat-RTN check")
        if index >= len(self.schemes):
            pytest.skip("fewer schemes in this suite")
        scheme = self.schemes[index]
        self._supported_or_skip(scheme)
        fix = self.fixture()
        err = output_error(fix, self.run_steps(scheme))
        rtn = self.rtn_error(scheme)
        assert err < (1 - self.margin) * rtn, (
            f"{self.quantizer.name} {scheme.describe()}: held-out layer output error {err:.5f} does not beat "
            f"RTN's {rtn:.5f} by {self.margin:.0%}"
        )
