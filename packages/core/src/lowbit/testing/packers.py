"""Packer conformance: ``unpack(pack(w)) == w`` bit for bit, and the layout contract.

Subclass and set ``packer``::

    from lowbit.testing import PackerConformance

    class TestMyPacker(PackerConformance):
        packer = MyPacker

Every combination of ``bits`` × ``group_sizes`` × ``sym`` × ``act_order`` is tried: where
``packer.check(scheme, K, N)`` accepts it, unpack∘pack must be the identity on codes, scales,
zeros and the effective g_idx (bias too, when the layout carries it); where it declines, it must
say why in a non-empty string. The packed tensors must be plain, contiguous and savable with
safetensors (what every exporter writes), and packing must neither change its input nor depend
on anything but it.

Override ``shape`` (``(N, K)``) for layouts with shape constraints, and ``min_zero`` for layouts
that cannot store small zero points (GPTQ v1 stores ``zero - 1``: set ``min_zero = 1``).
"""

from __future__ import annotations

import itertools
from typing import ClassVar

import pytest
import torch

from ..errors import LowbitError
from ..packing import Packer
from ..qweight import QuantizedWeight
from ..scheme import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, QuantScheme
from .kernels import make_qweight

__all__ = ["PackerConformance", "scheme_grid"]


def scheme_grid(bits=SUPPORTED_BITS, group_sizes=SUPPORTED_GROUP_SIZES, syms=(False, True),
                act_orders=(False, True)) -> list[QuantScheme]:
    """Every QuantScheme over the given axes, in a stable order."""
    return [QuantScheme(b, g, sym=s, act_order=a) for b, g, s, a in itertools.product(bits, group_sizes, syms, act_orders)]


def _ids(scheme: QuantScheme) -> str:
    return scheme.describe().replace(" ", "-")


class PackerConformance:
    packer: ClassVar[type[Packer]]
    bits: ClassVar[tuple[int, ...]] = SUPPORTED_BITS
    group_sizes: ClassVar[tuple[int, ...]] = SUPPORTED_GROUP_SIZES
    shape: ClassVar[tuple[int, int]] = (128, 256)  # (N, K)
    min_zero: ClassVar[int] = 0
    #: the layout stores the bias: then unpack must return it unchanged
    carries_bias: ClassVar[bool] = False

    # ---------------------------------------------------------------- helpers
    def make_weight(self, scheme: QuantScheme, seed: int = 0, bias: bool = False) -> QuantizedWeight:
        """A seeded random weight for ``scheme`` (zeros clamped to ``min_zero``)."""
        n, k = self.shape
        qw = make_qweight(n, k, scheme, seed=seed, bias=bias)
        if self.min_zero and not scheme.sym:
            qw = QuantizedWeight(qw.codes, qw.scales, qw.zeros.clamp(min=self.min_zero), scheme, qw.g_idx, qw.bias)
        return qw

    def extreme_weight(self, scheme: QuantScheme) -> QuantizedWeight:
        """Codes and zeros cycling through their whole range, scales spanning fp16's: catches bit-layout slips."""
        n, k = self.shape
        ng = scheme.num_groups(k)
        codes = ((torch.arange(n * k) * 7 + torch.arange(n * k) // k) % (scheme.maxq + 1)).to(torch.uint8).reshape(n, k)
        if scheme.sym:
            zeros = torch.full((n, ng), 1 << (scheme.bits - 1), dtype=torch.uint8)
        else:
            span = scheme.maxq + 1 - self.min_zero
            zeros = (self.min_zero + (torch.arange(n * ng) * 3) % span).to(torch.uint8).reshape(n, ng)
        scales = torch.logspace(-4, 4, n * ng).reshape(n, ng).half()
        g_idx = make_qweight(n, k, scheme).g_idx
        return QuantizedWeight(codes, scales, zeros, scheme, g_idx=g_idx)

    def _accepted(self, scheme: QuantScheme) -> None:
        n, k = self.shape
        reason = self.packer.check(scheme, k, n)
        if reason is not None:
            assert isinstance(reason, str) and reason.strip(), f"{self.packer.name} declined {scheme} without a reason"
            pytest.skip(f"{self.packer.name} declines {scheme.describe()}: {reason}")

    def roundtrip(self, qw: QuantizedWeight) -> QuantizedWeight:
        n, k = self.shape
        packed = self.packer().pack(qw)
        assert isinstance(packed, dict) and packed, "pack() must return a non-empty dict of named tensors"
        for name, t in packed.items():
            assert isinstance(name, str) and isinstance(t, torch.Tensor), f"pack() returned {name!r}: {type(t)}"
        return self.packer().unpack(packed, qw.scheme, k, n)

    def assert_same(self, qw: QuantizedWeight, back: QuantizedWeight) -> None:
        assert isinstance(back, QuantizedWeight)
        diff = qw.diff(back)
        assert not diff, f"{self.packer.name}: unpack(pack(w)) != w for {qw.scheme.describe()}: {diff}"
        assert back.scheme.bits == qw.scheme.bits and back.scheme.group_size == qw.scheme.group_size
        if self.carries_bias and qw.bias is not None:
            assert back.bias is not None and torch.equal(back.bias.float(), qw.bias.float()), "bias changed"

    # ---------------------------------------------------------------- tests
    def test_declares_itself(self):
        assert self.packer.name, "a packer needs a name (its layout name)"
        assert set(self.packer.supported_bits) <= set(SUPPORTED_BITS)

    @pytest.mark.parametrize("scheme", scheme_grid(), ids=_ids)
    def test_check_accepts_or_gives_reason(self, scheme):
        n, k = self.shape
        reason = self.packer.check(scheme, k, n)
        assert reason is None or (isinstance(reason, str) and reason.strip()), repr(reason)
        if scheme.bits not in self.packer.supported_bits or scheme.group_size not in self.packer.supported_group_sizes:
            assert reason, f"{self.packer.name} declares no support for {scheme.describe()} yet accepts it"
        if scheme.act_order and not self.packer.supports_act_order:
            assert reason, f"{self.packer.name} declares no act-order support yet accepts {scheme.describe()}"

    def accepted_schemes(self, act_orders=(False, True)) -> list[QuantScheme]:
        """This suite's bits × group sizes × sym × act-order that the packer holds at ``shape``
        (what it declines, test_check_accepts_or_gives_reason covers)."""
        n, k = self.shape
        grid = [QuantScheme(b, g, sym=s, act_order=a) for b, g, s, a in
                itertools.product(self.bits, self.group_sizes, (False, True), act_orders)]
        return [s for s in grid if self.packer.check(s, k, n) is None]

    def pytest_generate_tests(self, metafunc):
        """Parameters from this subclass's ``bits``, ``group_sizes`` and ``shape``."""
        name = metafunc.function.__name__
        if name == "test_unpack_pack_identity":
            metafunc.parametrize("scheme", self.accepted_schemes(), ids=_ids)
        elif name == "test_extreme_values":
            metafunc.parametrize("scheme", self.accepted_schemes(act_orders=(False,)), ids=_ids)

    def test_unpack_pack_identity(self, scheme):
        qw = self.make_weight(scheme, seed=scheme.bits * 100 + scheme.group_size, bias=self.carries_bias)
        self.assert_same(qw, self.roundtrip(qw))

    def test_extreme_values(self, scheme):
        qw = self.extreme_weight(scheme)
        self.assert_same(qw, self.roundtrip(qw))

    def _first_accepted(self) -> QuantScheme:
        n, k = self.shape
        for bits, gs in itertools.product(self.bits, self.group_sizes):
            scheme = QuantScheme(bits, gs)
            if self.packer.check(scheme, k, n) is None:
                return scheme
        pytest.skip(f"{self.packer.name} accepts no asymmetric scheme at shape {self.shape}")

    def test_packed_tensors_save_and_reload(self, tmp_path):
        """The layout contract: plain contiguous tensors that safetensors writes, read back to the same weight."""
        from safetensors.torch import load_file, save_file

        qw = self.make_weight(self._first_accepted(), seed=7)
        packed = self.packer().pack(qw)
        for name, t in packed.items():
            assert t.is_contiguous(), f"{name} is not contiguous"
            assert t.device.type == "cpu", f"{name} is on {t.device}"
        save_file({k: v.contiguous() for k, v in packed.items()}, str(tmp_path / "w.safetensors"))
        back = self.packer().unpack(load_file(str(tmp_path / "w.safetensors")), qw.scheme, qw.in_features, qw.out_features)
        self.assert_same(qw, back)

    def test_pack_is_pure(self):
        """Packing twice gives equal tensors and leaves the input untouched."""
        qw = self.make_weight(self._first_accepted(), seed=3)
        before = {k: v.clone() for k, v in qw.tensors().items()}
        a, b = self.packer().pack(qw), self.packer().pack(qw)
        assert a.keys() == b.keys()
        for name in a:
            assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), f"{name} differs between packs"
        for name, t in qw.tensors().items():
            assert torch.equal(t, before[name]), f"pack() modified the weight's {name}"

    def test_pack_refuses_what_check_declines(self):
        """Packing a declined scheme raises a LowbitError, never writes garbage."""
        n, k = self.shape
        for bits, gs in itertools.product(SUPPORTED_BITS, SUPPORTED_GROUP_SIZES):
            scheme = QuantScheme(bits, gs)
            if self.packer.check(scheme, k, n) is None:
                continue
            qw = make_qweight(n, k, scheme, seed=1)
            with pytest.raises(LowbitError):
                self.packer().pack(qw)
            return
        pytest.skip(f"{self.packer.name} accepts every scheme")
