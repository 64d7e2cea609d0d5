"""Every CPU kernel against the reference kernel (lowbit.testing.KernelConformance), plus the
cases the shared suite does not reach: both paths of cpu.avx2_int4, act-order per path, odd shapes."""

import pytest
import torch

from lowbit.kernels.base import KernelSpec
from lowbit.kernels.reference import ReferenceKernel
from lowbit.scheme import QuantScheme
from lowbit.testing import KernelConformance
from lowbit.testing.kernels import DEFAULT_RTOL, make_qweight
from lowbit_cpu.kernels import Avx2Int4Kernel, IpexWoqKernel, TorchInt4Kernel, TorchInt8Kernel


class TestAvx2Int4(KernelConformance):
    kernel = Avx2Int4Kernel


class TestTorchInt4(KernelConformance):
    kernel = TorchInt4Kernel


class TestTorchInt8(KernelConformance):
    kernel = TorchInt8Kernel
    group_sizes = (-1, 32, 64, 128)  # grouped 8-bit is declined (checked to give a reason)
    basic_bits = 8


class TestIpexWoq(KernelConformance):
    kernel = IpexWoqKernel  # skips with the probe's reason unless IPEX imports (tox -e cpu-ipex)


def _rel_err(kernel_cls, scheme, batch, dtype, shape=(256, 512), bias=True, seed=0, env=None):
    n, k = shape
    qw = make_qweight(n, k, scheme, seed=seed, bias=bias)
    assert kernel_cls.can_implement(KernelSpec.of(qw, dtype)) is None
    x = torch.randn(batch, k, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    ref = ReferenceKernel(qw, torch.device("cpu"), torch.float32).forward(x.float())
    out = kernel_cls(qw, torch.device("cpu"), dtype).forward(x)
    assert out.dtype == dtype and out.shape == (batch, n)
    return float((out.float() - ref).norm() / ref.norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("path", ["decode", "prefill"])
@pytest.mark.parametrize("gs,act_order", [(32, False), (128, True), (-1, False), (64, True)])
def test_avx2_both_paths(monkeypatch, dtype, path, gs, act_order):
    """Force each path with LOWBIT_CPU_PREFILL_MIN_BATCH so both are checked at every batch."""
    monkeypatch.setenv("LOWBIT_CPU_PREFILL_MIN_BATCH", "1000000" if path == "decode" else "1")
    for batch in (1, 5, 33):
        err = _rel_err(Avx2Int4Kernel, QuantScheme(4, gs, act_order=act_order), batch, dtype, seed=batch)
        assert err <= DEFAULT_RTOL[dtype], f"{path} gs{gs} batch {batch}: {err:.2e}"


def test_avx2_int16_activation_error_is_far_below_bf16_rounding():
    """The int16 rounding of activations (decode path, bf16/fp16) adds < 1e-4 relative error:
    measured against the same kernel's fp32 path on the same fp16-representable input."""
    qw = make_qweight(256, 1024, QuantScheme(4, 128), seed=3)
    x = torch.randn(3, 1024, generator=torch.Generator().manual_seed(4)).half()
    k16 = Avx2Int4Kernel(qw, torch.device("cpu"), torch.float16)
    k32 = Avx2Int4Kernel(qw, torch.device("cpu"), torch.float32)
    from lowbit_cpu import native
    y16 = native.linear_i16(x.float().contiguous(), k16.packed, k16.scales, k16.zs, None, k16.group, k16.block, 1,
                            torch.float32)
    y32 = k32.forward(x.float())
    assert float((y16 - y32).norm() / y32.norm()) < 1e-4


def test_avx2_odd_shapes_and_wide_k():
    """Per channel with K not a power of two (576: the demo model) and N not a multiple of 16."""
    for n, k, gs in ((40, 576, -1), (72, 576, 64), (24, 2752, -1), (16, 4160, -1)):
        err = _rel_err(Avx2Int4Kernel, QuantScheme(4, gs), 3, torch.float32, shape=(n, k))
        assert err <= 1e-4, (n, k, gs, err)


def test_avx2_declines_k_not_multiple_of_64():
    spec = KernelSpec(QuantScheme(4, -1), in_features=96, out_features=64, dtype=torch.bfloat16)
    assert "multiple of 64" in Avx2Int4Kernel.can_implement(spec)


def test_pack_nibbles_golden():
    from lowbit_cpu.native import pack_nibbles

    codes = (torch.arange(64) % 16).to(torch.uint8).reshape(1, 64)
    assert pack_nibbles(codes)[0].tolist() == [v for j in range(16) for v in (j * 0x11, j * 0x11)]
    codes = torch.arange(64).to(torch.uint8).reshape(1, 64) // 16  # columns 0-15 → 0, 16-31 → 1, ...
    assert pack_nibbles(codes)[0].tolist() == [0x10, 0x32] * 16


def test_torch_int4_declines_with_reasons():
    pc = KernelSpec(QuantScheme(4, -1), in_features=576, out_features=64, dtype=torch.bfloat16)
    assert "per channel" in TorchInt4Kernel.can_implement(pc)
    odd_n = KernelSpec(QuantScheme(4, 64), in_features=576, out_features=40, dtype=torch.bfloat16)
    assert "multiple of 16" in TorchInt4Kernel.can_implement(odd_n)
    w3 = KernelSpec(QuantScheme(3, 64), in_features=576, out_features=64, dtype=torch.bfloat16)
    assert "bits" in TorchInt4Kernel.can_implement(w3)


def test_torch_int8_asym_correction():
    """Asymmetric 8-bit goes through the sum(x) * (128 - z) * s correction."""
    err = _rel_err(TorchInt8Kernel, QuantScheme(8, -1, sym=False), 7, torch.float32)
    assert err <= 1e-4


def test_act_order_rejects_uneven_groups():
    from lowbit.errors import UnsupportedSchemeError
    from lowbit.qweight import QuantizedWeight

    qw = make_qweight(32, 128, QuantScheme(4, 32, act_order=True))
    g = qw.g_idx.clone()
    g[g == 0] = 1  # group 0 empty, group 1 has 64 columns
    g[0] = 0
    bad = QuantizedWeight(qw.codes, qw.scales, qw.zeros, qw.scheme, g_idx=g)
    with pytest.raises(UnsupportedSchemeError, match="columns in a group"):
        Avx2Int4Kernel(bad, torch.device("cpu"), torch.float32)


def test_avx2_kernel_deepcopies_and_reuses_scratch():
    import copy

    qw = make_qweight(64, 128, QuantScheme(4, 64), bias=True)
    k = Avx2Int4Kernel(qw, torch.device("cpu"), torch.bfloat16)
    x = torch.randn(3, 128).bfloat16()
    y1 = k.forward(x)
    y2 = k.forward(x[:1])  # smaller batch reuses the same scratch
    assert torch.equal(y1[:1], y2)
    assert torch.equal(copy.deepcopy(k).forward(x), y1)
