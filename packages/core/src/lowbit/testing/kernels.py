"""Kernel conformance: a kernel's output against the dequantization formula on the same weights.

Subclass and set ``kernel``; override ``device``, ``bits``, ``group_sizes``, ``batches``,
``dtypes``, ``shape`` or the tolerances where your kernel needs it. Every combination the kernel
declares it can implement is checked; combinations it declines are checked to decline with a
reason, and skipped; a kernel must accept at least one of the suite's combinations.

The oracle is :func:`oracle`: formats.md §0.1's formula evaluated in float64 straight from codes,
scales, zeros and group indices, sharing no code with any kernel (the reference kernel included).
"""

from __future__ import annotations

import itertools
from typing import ClassVar

import pytest
import torch

from ..kernels.base import Kernel, KernelSpec
from ..primitives import choose_qparams, quantize_codes
from ..qweight import QuantizedWeight
from ..scheme import QuantScheme

# relative error bound ||y - y_ref|| / ||y_ref|| per activation dtype
DEFAULT_RTOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_qweight(n: int, k: int, scheme: QuantScheme, seed: int = 0, bias: bool = False) -> QuantizedWeight:
    """A seeded random QuantizedWeight; with ``scheme.act_order`` a random g_idx permutation."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    g_idx = None
    if scheme.act_order:
        gs = scheme.group_width(k)
        perm = torch.randperm(k, generator=gen)
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[perm] = (torch.arange(k) // gs).to(torch.int32)
    scales, zeros = choose_qparams(w, scheme)
    codes = quantize_codes(w, scales, zeros, scheme, g_idx)
    b = torch.randn(n, generator=gen) if bias else None
    return QuantizedWeight(codes, scales, zeros, scheme, g_idx=g_idx, bias=b)


def oracle(qw: QuantizedWeight, x: torch.Tensor) -> torch.Tensor:
    """``x @ W.T + bias`` in float64, ``W[n, k] = (codes[n, k] - zeros[n, g(k)]) * scales[n, g(k)]``
    with ``g(k) = g_idx[k]`` or ``k // group width``; returned as float32 on ``x``'s device."""
    k = qw.codes.shape[1]
    g = qw.g_idx.long() if qw.g_idx is not None else torch.arange(k) // qw.scheme.group_width(k)
    w = (qw.codes.double() - qw.zeros.double()[:, g]) * qw.scales.double()[:, g]
    y = x.detach().cpu().double() @ w.T
    if qw.bias is not None:
        y = y + qw.bias.double()
    return y.float().to(x.device)


class KernelConformance:
    kernel: ClassVar[type[Kernel]]
    device: ClassVar[str] = "cpu"
    bits: ClassVar[tuple[int, ...]] = (2, 3, 4, 8)
    group_sizes: ClassVar[tuple[int, ...]] = (32, 64, 128, -1)
    batches: ClassVar[tuple[int, ...]] = (1, 7, 33, 128)
    dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.bfloat16, torch.float16, torch.float32)
    shape: ClassVar[tuple[int, int]] = (256, 512)  # (N, K)
    basic_bits: ClassVar[int] = 4  # bits of the scheme the batch/dtype and bias tests use
    rtol: ClassVar[dict] = DEFAULT_RTOL

    def _probe_or_skip(self):
        reason = self.kernel.probe(torch.device(self.device))
        if reason is not None:
            pytest.skip(f"{self.kernel.name}: {reason}")

    def _check(self, scheme: QuantScheme, batch: int, dtype: torch.dtype, bias: bool = False) -> None:
        self._probe_or_skip()
        n, k = self.shape
        qw = make_qweight(n, k, scheme, seed=batch + scheme.bits, bias=bias)
        spec = KernelSpec.of(qw, dtype)
        reason = self.kernel.can_implement(spec)
        if reason is not None:
            assert isinstance(reason, str) and reason, "a declined spec must give a reason"
            pytest.skip(f"{self.kernel.name} declines {spec.describe()}: {reason}")
        device = torch.device(self.device)
        x = torch.randn(batch, k, generator=torch.Generator().manual_seed(batch)).to(device=device, dtype=dtype)
        ref = oracle(qw, x)
        out = self.kernel(qw, device, dtype).forward(x)
        assert out.shape == (batch, n) and out.dtype == dtype, (out.shape, out.dtype)
        err = (out.float() - ref).norm() / ref.norm()
        assert err <= self.rtol[dtype], f"{spec.describe()} batch {batch}: relative error {err:.2e} > {self.rtol[dtype]:.0e}"

    def pytest_generate_tests(self, metafunc):
        """Parameters from this subclass's ``bits``, ``group_sizes`` and ``dtypes``."""
        name = metafunc.function.__name__
        if name == "test_bits_group_sizes":
            schemes = [QuantScheme(b, g, sym=s, act_order=a) for b, g, s, a in
                       itertools.product(self.bits, self.group_sizes, (False, True), (False, True))]
            metafunc.parametrize("scheme", schemes, ids=lambda s: s.describe().replace(" ", "-"))
        elif name == "test_batches_and_dtypes":
            metafunc.parametrize("dtype", self.dtypes, ids=str)

    def test_bits_group_sizes(self, scheme):
        """Each scheme of the suite against the reference kernel; a declined one is skipped with its reason."""
        self._check(scheme, self.batches[0], self.dtypes[0])

    def test_batches_and_dtypes(self, dtype):
        for batch in self.batches:
            self._check(QuantScheme(self.basic_bits, self.group_sizes[0]), batch, dtype)

    def test_bias_and_3d_input(self):
        self._probe_or_skip()
        n, k = self.shape
        scheme = QuantScheme(self.basic_bits, self.group_sizes[0])
        qw = make_qweight(n, k, scheme, bias=True)
        dtype = self.dtypes[0]
        if self.kernel.can_implement(KernelSpec.of(qw, dtype)) is not None:
            pytest.skip(f"kernel declines the basic {scheme.describe()} spec")
        device = torch.device(self.device)
        x = torch.randn(2, 3, k).to(device=device, dtype=dtype)
        ref = oracle(qw, x.reshape(6, k)).reshape(2, 3, n)
        out = self.kernel(qw, device, dtype).forward(x)
        assert out.shape == (2, 3, n)
        assert (out.float() - ref).norm() / ref.norm() <= self.rtol[dtype]

    def test_accepts_some_spec(self):
        """A kernel that declines every combination of the suite would pass it by skipping: refuse that."""
        self._probe_or_skip()
        n, k = self.shape
        reasons = {}
        for b, g, dtype in itertools.product(self.bits, self.group_sizes, self.dtypes):
            spec = KernelSpec(QuantScheme(b, g), k, n, dtype)
            reason = self.kernel.can_implement(spec)
            if reason is None:
                return
            reasons[spec.describe()] = reason
        pytest.fail(f"{self.kernel.name} declines every spec of the suite: {reasons}")

    def test_declares_itself(self):
        assert self.kernel.name, "a kernel needs a name"
        assert isinstance(self.kernel.priority, int)
        reason = self.kernel.probe(torch.device("meta"))
        assert reason is None or isinstance(reason, str)
