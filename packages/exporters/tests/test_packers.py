"""unpack(pack(w)) == w bit-exact for every packer over all supported bits × group sizes × act-order
(sym and asym), and the packers' refusals."""

from __future__ import annotations

import itertools

import pytest
import torch

from lowbit import QuantScheme, UnsupportedSchemeError, registry
from lowbit.packing import pack_bits, unpack_bits
from lowbit.testing import random_qweight

PACKERS = ("autoawq-gemm", "autoawq-gemv", "gptq", "gptq-v2")


def cases():
    for name in PACKERS:
        cls = registry("packers").get(name)
        for bits, gs, act, sym in itertools.product((2, 3, 4, 8), (32, 64, 128, -1), (False, True), (False, True)):
            scheme = QuantScheme(bits, gs, sym=sym, act_order=act)
            if cls.check(scheme, 256, 96) is None:
                yield pytest.param(name, scheme, id=f"{name}-{scheme.describe().replace(' ', '-')}")


@pytest.mark.parametrize("name, scheme", list(cases()))
def test_pack_unpack_identity(name, scheme):
    packer = registry("packers").get(name)()
    qw = random_qweight(96, 256, scheme, seed=hash((name, scheme)) % 1000, bias=True, edges=True,
                        bias_dtype=torch.float16)
    if name == "gptq" and not scheme.sym:  # v1 cannot store a zero of 0 (formats.md §2.3)
        qw.zeros.clamp_(min=1)
    packed = packer.pack(qw)
    assert all(t.dtype in (torch.int32, torch.float16) for t in packed.values())
    back = packer.unpack({**packed, "bias": qw.bias}, scheme, 256, 96)
    assert back.equal(qw), back.diff(qw)
    assert torch.equal(back.dequantize(), qw.dequantize())


def test_every_combination_is_covered():
    ids = {(n, s.bits, s.group_size, s.act_order) for n, s in (c.values for c in cases())}
    # GPTQ: all 4 bits × 4 group sizes × act-order; AWQ: 4-bit only, no act-order; GEMV: no per-channel
    assert sum(1 for i in ids if i[0] == "gptq") == 4 * 4 * 2
    assert sum(1 for i in ids if i[0] == "gptq-v2") == 4 * 4 * 2
    assert sum(1 for i in ids if i[0] == "autoawq-gemm") == 4
    assert sum(1 for i in ids if i[0] == "autoawq-gemv") == 3


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bitstream_identity(bits):
    gen = torch.Generator().manual_seed(bits)
    v = torch.randint(0, 1 << bits, (5, 96), generator=gen).to(torch.uint8)
    words = pack_bits(v, bits)
    assert words.dtype == torch.int32 and list(words.shape) == [5, 96 * bits // 32]
    assert torch.equal(unpack_bits(words, bits), v)


@pytest.mark.parametrize("name, scheme, match", [
    ("autoawq-gemm", QuantScheme(3, 64), "bits"),
    ("autoawq-gemm", QuantScheme(4, 64, act_order=True), "act-order"),
    ("autoawq-gemv", QuantScheme(4, -1), "group sizes"),
    ("gptq", QuantScheme(4, 32), None),
])
def test_packer_check(name, scheme, match):
    reason = registry("packers").get(name).check(scheme, 256, 96)
    if match is None:
        assert reason is None
    else:
        assert match in reason


def test_gptq_shape_needs_multiples_of_32():
    cls = registry("packers").get("gptq")
    assert "multiples of 32" in cls.check(QuantScheme(4, -1), 48, 64)
    assert "multiples of 32" in cls.check(QuantScheme(4, -1), 64, 40)
    qw = random_qweight(40, 64, QuantScheme(4, -1, sym=True), edges=True)
    with pytest.raises(UnsupportedSchemeError, match="multiples of 32"):
        cls().pack(qw)


def test_gptq_v1_refuses_zero_point_zero():
    qw = random_qweight(32, 128, QuantScheme(4, 64), edges=True)
    assert int(qw.zeros.min()) == 0
    with pytest.raises(UnsupportedSchemeError, match="gptq-v2"):
        registry("packers").get("gptq")().pack(qw)
    back = registry("packers").get("gptq-v2")()
    assert back.unpack(back.pack(qw), qw.scheme, 128, 32).equal(qw)


def test_exporters_write_through_the_registered_packer(monkeypatch, tmp_path):
    """The GPTQ writer asks registry("packers") for its layout: a packer registered under that name
    (here a spy around the real one) is the one that packs."""
    from exporters_testlib import tiny_qmodel

    from lowbit import export, registry
    from lowbit_exporters.gptq import GPTQPacker

    calls = []

    class Spy(GPTQPacker):
        def pack(self, qw):
            calls.append(qw.out_features)
            return super().pack(qw)

    reg = registry("packers")
    monkeypatch.setitem(reg._items, "gptq", Spy)
    qm = tiny_qmodel(QuantScheme(4, 64, sym=True))
    export(qm, "gptq", tmp_path / "g")
    assert len(calls) == len(qm.qweights)
