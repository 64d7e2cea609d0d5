"""Exporter conformance: write → read gives back equal QuantizedWeights, and detection is exact.

Subclass and set ``exporter``::

    from lowbit.testing import ExporterConformance

    class TestMyFormat(ExporterConformance):
        exporter = MyFormat

The suite quantizes a tiny seeded llama (RTN per linear, plus a random act-order permutation for
act-order schemes) for every scheme in ``schemes``; where ``exporter.check(scheme, config)``
declines, the reason must be a non-empty string. For accepted schemes it checks:

- ``write`` then ``read``: the same quantized modules, each ``QuantizedWeight.equal`` (bit-exact
  codes, scales, zeros, effective g_idx), the same config shape, float tensors within
  ``float_rtol`` (formats that store floats in fp16 set it to fp16's resolution);
- ``detect`` is True on its own output and False on an empty directory and on a lowbit
  checkpoint (unless it is the lowbit format); ``detect_format`` names it when it is registered;
- ``inspect`` reports ``format``, ``version``, ``scheme`` and ``runtimes``;
- the reloaded checkpoint runs: its logits match the original's dequantized float model;
- tied embeddings survive the round trip.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from ..errors import LowbitError
from ..exporter import Exporter
from ..primitives import choose_qparams, quantize_codes
from ..qmodel import QuantizedModel
from ..qweight import QuantizedWeight
from ..scheme import QuantScheme

__all__ = ["ExporterConformance", "tiny_quantized_model"]


@functools.lru_cache(maxsize=4)
def _tokenizer(vocab_size: int):
    from .models import tiny_tokenizer

    return tiny_tokenizer(vocab_size)


def tiny_quantized_model(scheme: QuantScheme, seed: int = 0, tokenizer: bool = True, **overrides) -> QuantizedModel:
    """A tiny seeded llama with every decoder linear quantized round-to-nearest under ``scheme``.

    With ``scheme.act_order`` each linear gets a seeded random column permutation as g_idx (the
    shape GPTQ's act-order produces), so formats must carry g_idx to pass. ``overrides`` go to
    the LlamaConfig (e.g. ``tie_word_embeddings=True``, ``hidden_size=...``).
    """
    from ..models import adapter_for
    from ..pipeline import float_tensors_of
    from ..plugins import registry
    from .models import tiny_llama

    model = tiny_llama(seed, **overrides)
    adapter = adapter_for(model.config, registry("architectures"))
    gen = torch.Generator().manual_seed(seed)
    qweights: dict[str, QuantizedWeight] = {}
    for i, layer in enumerate(adapter.layers(model)):
        for group in adapter.groups(layer):
            for path in group.linears:
                lin = layer.get_submodule(path)
                w = lin.weight.detach()
                k = w.shape[1]
                scheme.check_shape(k, path)
                g_idx = None
                if scheme.act_order:
                    gs = scheme.group_width(k)
                    g_idx = torch.empty(k, dtype=torch.int32)
                    g_idx[torch.randperm(k, generator=gen)] = (torch.arange(k) // gs).to(torch.int32)
                scales, zeros = choose_qparams(w, scheme)
                codes = quantize_codes(w, scales, zeros, scheme, g_idx)
                bias = None if lin.bias is None else lin.bias.detach().clone()
                qweights[adapter.layer_prefix(i) + path] = QuantizedWeight(codes, scales, zeros, scheme, g_idx, bias)
    tok = _tokenizer(model.config.vocab_size) if tokenizer else None
    manifest = {"source": {"model": f"tiny-llama-seed{seed}"}, "recipe": {"method": "rtn"}}
    return QuantizedModel(model.config, scheme, qweights, float_tensors_of(model, qweights), tok, None, manifest,
                          adapter=adapter)


def _head(qm: QuantizedModel) -> str | None:
    """The name of ``qm``'s output projection weight, as its architecture adapter gives it (None
    for a model type no adapter serves)."""
    from ..exporting import with_adapter

    adapter = with_adapter(qm).adapter
    return None if adapter is None else f"{adapter.lm_head}.weight"


def _ids(scheme: QuantScheme) -> str:
    return scheme.describe().replace(" ", "-")


DEFAULT_SCHEMES = (
    QuantScheme(4, 64),
    QuantScheme(4, 64, sym=True),
    QuantScheme(4, 128, act_order=True),
    QuantScheme(4, -1),
    QuantScheme(4, -1, sym=True),
    QuantScheme(8, 32),
    QuantScheme(3, 128),
    QuantScheme(2, 64, sym=True),
)


class ExporterConformance:
    exporter: ClassVar[type[Exporter]]
    schemes: ClassVar[tuple[QuantScheme, ...]] = DEFAULT_SCHEMES
    #: LlamaConfig overrides for the tiny model (hidden 128, intermediate 256 by default)
    model_overrides: ClassVar[dict] = {}
    #: relative tolerance on float tensors (embeddings, norms, lm_head); 0 means bit-exact
    float_rtol: ClassVar[float] = 0.0
    #: logits of the reloaded model vs the original's dequantized weights (fp32, reference kernel)
    logits_rtol: ClassVar[float] = 1e-4

    # ---------------------------------------------------------------- helpers
    def model_for(self, scheme: QuantScheme, **overrides) -> QuantizedModel:
        return tiny_quantized_model(scheme, **{**self.model_overrides, **overrides})

    def _accepted_or_skip(self, qm: QuantizedModel) -> None:
        reason = self.exporter.check(qm.scheme, qm.config)
        if reason is not None:
            assert isinstance(reason, str) and reason.strip(), f"{self.exporter.name} declined without a reason"
            pytest.skip(f"{self.exporter.name} declines {qm.scheme.describe()}: {reason}")

    def write(self, qm: QuantizedModel, out: Path) -> Path:
        """Write through export() when registered (atomic, checks formats), else straight through write()."""
        from ..exporting import export
        from ..plugins import registry

        if self.exporter.name in registry("exporters") and registry("exporters").get(self.exporter.name) is self.exporter:
            return export(qm, self.exporter.name, out)
        out.mkdir(parents=True)
        self.exporter().write(qm, out)
        return out

    def assert_same_model(self, qm: QuantizedModel, back: QuantizedModel) -> None:
        assert isinstance(back, QuantizedModel)
        assert sorted(back.qweights) == sorted(qm.qweights), "different quantized modules after reading back"
        for mod, qw in qm.qweights.items():
            diff = qw.diff(back.qweights[mod])
            assert not diff, f"{self.exporter.name}: {mod} differs after write → read: {diff}"
            if qw.bias is not None:
                assert back.qweights[mod].bias is not None, f"{mod}: bias lost"
                torch.testing.assert_close(back.qweights[mod].bias.float(), qw.bias.float(),
                                           rtol=self.float_rtol, atol=self.float_rtol)
        assert back.scheme.bits == qm.scheme.bits and back.scheme.group_size == qm.scheme.group_size
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "vocab_size"):
            assert getattr(back.config, key) == getattr(qm.config, key), f"config {key} changed"
        tied = getattr(qm.config, "tie_word_embeddings", False)
        for name, t in qm.float_tensors.items():
            if tied and name == _head(qm):
                continue
            assert name in back.float_tensors, f"float tensor {name} lost"
            got = back.float_tensors[name]
            assert got.shape == t.shape, f"{name}: shape {list(got.shape)} vs {list(t.shape)}"
            if t.is_floating_point():
                torch.testing.assert_close(got.float(), t.float(), rtol=self.float_rtol, atol=self.float_rtol * 1e-2,
                                           msg=lambda m, n=name: f"{n}: {m}")
            else:
                assert torch.equal(got, t), f"{name} differs"

    def pytest_generate_tests(self, metafunc):
        """Parameters from this subclass's ``schemes``."""
        if "scheme" in metafunc.fixturenames and metafunc.function.__name__ == "test_write_read_equal":
            metafunc.parametrize("scheme", self.schemes, ids=_ids)

    # ---------------------------------------------------------------- tests
    def test_declares_itself(self):
        assert self.exporter.name, "an exporter needs a name (what --format refers to)"
        assert isinstance(self.exporter.description, str)

    @pytest.mark.parametrize("scheme", DEFAULT_SCHEMES + (QuantScheme(3, -1), QuantScheme(8, 128, act_order=True)),
                             ids=_ids)
    def test_check_accepts_or_gives_reason(self, scheme):
        reason = self.exporter.check(scheme, None)
        assert reason is None or (isinstance(reason, str) and reason.strip()), repr(reason)

    def test_write_read_equal(self, scheme, tmp_path):
        qm = self.model_for(scheme)
        self._accepted_or_skip(qm)
        out = self.write(qm, tmp_path / "ckpt")
        self.assert_same_model(qm, self.exporter().read(out))

    def _written(self, tmp_path) -> tuple[QuantizedModel, Path]:
        for scheme in self.schemes:
            qm = self.model_for(scheme)
            if self.exporter.check(qm.scheme, qm.config) is None:
                return qm, self.write(qm, tmp_path / "ckpt")
        pytest.skip(f"{self.exporter.name} accepts none of this suite's schemes")

    def test_detect(self, tmp_path):
        from ..checkpoint import LowbitCheckpoint

        qm, out = self._written(tmp_path)
        assert self.exporter.detect(out), f"{self.exporter.name}.detect() does not recognise its own output"
        (tmp_path / "empty").mkdir()
        assert not self.exporter.detect(tmp_path / "empty"), "detect() is True on an empty directory"
        if self.exporter is not LowbitCheckpoint and self.exporter.name != LowbitCheckpoint.name:
            (tmp_path / "lowbit").mkdir()
            LowbitCheckpoint().write(qm, tmp_path / "lowbit")
            assert not self.exporter.detect(tmp_path / "lowbit"), (
                f"{self.exporter.name}.detect() claims a lowbit checkpoint")

    def test_detect_format_names_it(self, tmp_path):
        from ..exporting import detect_format
        from ..plugins import registry

        if self.exporter.name not in registry("exporters"):
            pytest.skip(f"{self.exporter.name} is not registered (install the plugin to run this)")
        _, out = self._written(tmp_path)
        assert detect_format(out) == self.exporter.name

    def test_inspect(self, tmp_path):
        qm, out = self._written(tmp_path)
        info = self.exporter().inspect(out)
        for key in ("format", "version", "scheme", "runtimes"):
            assert key in info, f"inspect() lacks {key!r}"
        assert isinstance(info["runtimes"], dict) and info["runtimes"]

    def test_read_rejects_what_it_did_not_write(self, tmp_path):
        (tmp_path / "empty").mkdir()
        with pytest.raises((LowbitError, OSError, ValueError, KeyError)):
            self.exporter().read(tmp_path / "empty")

    def test_reloaded_model_runs(self, tmp_path):
        from ..run.nn import build_float_model, build_model

        qm, out = self._written(tmp_path)
        back = self.exporter().read(out)
        ids = torch.randint(0, qm.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = build_float_model(qm, torch.float32)(ids).logits
            got = build_model(back, "cpu", torch.float32, kernel="reference")(ids).logits
        err = float((got - ref).norm() / ref.norm())
        assert err <= self.logits_rtol, f"reloaded logits differ: relative error {err:.2e} > {self.logits_rtol:.0e}"

    def test_tied_embeddings(self, tmp_path):
        scheme = next((s for s in self.schemes if self.exporter.check(s, None) is None), None)
        if scheme is None:
            pytest.skip(f"{self.exporter.name} accepts none of this suite's schemes")
        qm = self.model_for(scheme, tie_word_embeddings=True)
        self._accepted_or_skip(qm)
        assert _head(qm) not in qm.float_tensors
        back = self.exporter().read(self.write(qm, tmp_path / "tied"))
        assert getattr(back.config, "tie_word_embeddings", False), "tie_word_embeddings lost"
        self.assert_same_model(qm, back)
