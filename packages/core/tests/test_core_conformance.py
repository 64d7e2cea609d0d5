"""lowbit's own things through the conformance suites it ships to plugin authors.

Core registers no packer, so a small K-packed int32 layout is written here the way a plugin
would; a deliberately broken copy checks that the suite actually catches bit-layout slips.
"""

from __future__ import annotations

import pytest
import torch

from lowbit import Packer, QuantizedWeight, QuantScheme, UnsupportedSchemeError
from lowbit.algorithms.rtn import RTN
from lowbit.checkpoint import LowbitCheckpoint
from lowbit.testing import ExporterConformance, PackerConformance, QuantizerConformance


class KPackedInt32(Packer):
    """Codes packed along K into int32 words, LSB first (``32 // bits`` per word); 3-bit declined."""

    name = "test-kpacked-int32"
    supported_bits = (2, 4, 8)

    @classmethod
    def check(cls, scheme, in_features, out_features):
        reason = super().check(scheme, in_features, out_features)
        if reason is None and in_features % (32 // scheme.bits):
            reason = f"K={in_features} is not a multiple of {32 // scheme.bits}"
        return reason

    def pack(self, qw):
        reason = self.check(qw.scheme, qw.in_features, qw.out_features)
        if reason:
            raise UnsupportedSchemeError(f"cannot pack {qw.scheme.describe()} as {self.name}: {reason}.")
        bits, per = qw.scheme.bits, 32 // qw.scheme.bits
        c = qw.codes.to(torch.int64).reshape(qw.out_features, -1, per)
        shifts = torch.arange(per) * bits
        words = (c << shifts).sum(-1)
        words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
        out = {"qweight": words.contiguous(), "scales": qw.scales.clone(), "zeros": qw.zeros.clone()}
        if not qw.has_trivial_g_idx():
            out["g_idx"] = qw.g_idx.to(torch.int32).clone()
        return out

    def unpack(self, tensors, scheme, in_features, out_features):
        bits, per = scheme.bits, 32 // scheme.bits
        w = tensors["qweight"].to(torch.int64) & 0xFFFFFFFF
        codes = (w.unsqueeze(-1) >> (torch.arange(per) * bits)) & scheme.maxq
        return QuantizedWeight(codes.reshape(out_features, in_features).to(torch.uint8), tensors["scales"],
                               tensors["zeros"], scheme, g_idx=tensors.get("g_idx"))


class TestKPackedInt32(PackerConformance):
    packer = KPackedInt32


class DropsTopBit(KPackedInt32):
    name = "test-broken"

    def unpack(self, tensors, scheme, in_features, out_features):
        qw = super().unpack(tensors, scheme, in_features, out_features)
        return QuantizedWeight(qw.codes & (scheme.maxq >> 1), qw.scales, qw.zeros, scheme, qw.g_idx)


def test_packer_suite_catches_a_broken_layout():
    suite = PackerConformance()
    suite.packer = DropsTopBit
    with pytest.raises(AssertionError, match="unpack\\(pack\\(w\\)\\) != w"):
        suite.test_extreme_values(QuantScheme(4, 64))


class NoReason(KPackedInt32):
    name = "test-no-reason"

    @classmethod
    def check(cls, scheme, in_features, out_features):
        return "" if scheme.bits == 3 else super().check(scheme, in_features, out_features)


def test_packer_suite_wants_a_reason():
    suite = PackerConformance()
    suite.packer = NoReason
    with pytest.raises(AssertionError):
        suite.test_check_accepts_or_gives_reason(QuantScheme(3, 64))


class TestLowbitCheckpoint(ExporterConformance):
    exporter = LowbitCheckpoint


class TestRTN(QuantizerConformance):
    quantizer = RTN
    beats_rtn = False  # RTN is the baseline


class WorseThanRTN(RTN):
    """Rounds toward zero instead of to nearest: a real but worse quantizer."""

    name = "test-truncate"

    @torch.no_grad()
    def apply(self, ctx):
        from lowbit.primitives import choose_qparams

        for path in ctx.unquantized():
            w = ctx.module(path).weight.detach()
            scales, zeros = choose_qparams(w, self.scheme)
            gi = torch.arange(w.shape[1]) // (w.shape[1] if self.scheme.group_size == -1 else self.scheme.group_size)
            codes = torch.clamp(torch.trunc(w / scales.float()[:, gi]) + zeros.float()[:, gi], 0, self.scheme.maxq)
            ctx.set_quantized(path, QuantizedWeight(codes.to(torch.uint8), scales, zeros, self.scheme))


def test_quantizer_suite_fails_a_step_worse_than_rtn():
    suite = QuantizerConformance()
    suite.quantizer = WorseThanRTN
    with pytest.raises(AssertionError, match="does not beat RTN"):
        suite.test_beats_rtn(0)
