"""Every CPU kernel against the reference kernel (lowbit.testing.KernelConformance), plus the
cases the shared suite does not reach: both paths of cpu.avx2_int4, act-order per path, odd shapes."""

import pytest
import torch

from lowbit.kernels.base import KernelSpec
from lowbit.kernels.reference import ReferenceKernel
from lowbit.scheme import QuantScheme
from lowbit.testing import KernelConformance
from lowbit.testing.kernels import DEFAULT_RTOL, make_qweight
from lowbit_cpu.kernels import (
    Avx2Int4Kernel,
    IpexWoqKernel,
    TorchInt4Kernel,
    TorchInt8Kernel,
    VnniInt4Kernel,
    VnniInt8Kernel,
)


class TestAvx2Int4(KernelConformance):
    kernel = Avx2Int4Kernel


class TestTorchInt4(KernelConformance):
    kernel = TorchInt4Kernel


class TestTorchInt8(KernelConformance):
    kernel = TorchInt8Kernel
    group_sizes = (-1, 32, 64, 128)  # grouped 8-bit is declined (checked to give a reason)
    basic_bits = 8


class TestVnniInt4(KernelConformance):
    """Skips with the probe's reason on CPUs without AVX-512 VNNI. bf16 activations only (fp16/fp32 are
    declined with a reason, and checked to be); the tolerance is the bf16 one, 1.6e-2: int8 activations
    (scale max|x|/127 per 64 columns) add ~0.6 % relative RMS error on Gaussian inputs, measured
    0.7-0.9 % here, against ~0.2 % for bf16 output rounding alone."""

    kernel = VnniInt4Kernel
    group_sizes = (64, 128, -1, 32)  # group 32 is declined (checked to give a reason)
    shape = (72, 1152)  # N not a multiple of 16; odd K/64 (a trailing run) is checked below at K = 576


class TestVnniInt8(KernelConformance):
    """8-bit weights on VNNI: same activation rounding and tolerance argument as TestVnniInt4."""

    kernel = VnniInt8Kernel
    bits = (8, 4)  # 4-bit is declined with a reason
    basic_bits = 8
    group_sizes = (-1, 64, 128, 32)
    shape = (72, 1152)


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


def _vnni_or_skip():
    reason = VnniInt4Kernel.probe(torch.device("cpu"))
    if reason is not None:
        pytest.skip(f"cpu.vnni_int4: {reason}")


def _quant_x_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VNNI kernel's activation rounding, written out in torch: int8 per row and run of 64 columns."""
    m, k = x.shape
    runs = x.float().reshape(m, k // 64, 64)
    amax = runs.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    q = torch.round(runs * (1 / scale)).clamp(-127, 127)
    return q.reshape(m, k), scale[..., 0]


def test_vnni_activation_layout_and_rounding():
    """quant_x_vnni's int8 values, in the kernel's permuted pair layout, equal the torch rounding; run
    scales and group sums match. K = 576 has a trailing odd run."""
    _vnni_or_skip()
    from lowbit_cpu import native

    x = (torch.randn(3, 576, generator=torch.Generator().manual_seed(7)) * 3).bfloat16()
    x8, xs, xsum = native.quant_x_vnni(x, 64)
    q, scale = _quant_x_int8(x)
    nr = 576 // 64
    order = []  # column of each byte of a row, by the layout in csrc/int4_vnni.c
    for p in range((nr + 1) // 2):
        runs = [2 * p, 2 * p + 1] if 2 * p + 1 < nr else [2 * p]
        for half in ((0, 32), (16, 48)):
            for r in runs:
                order += [r * 64 + c for j in range(16) for c in (half[0] + j, half[1] + j)]
    assert sorted(order) == list(range(576))
    assert torch.equal(x8.float(), q[:, order])
    assert torch.equal(native.quant_x_vnni(x, 64, natural=True)[0].float(), q)  # the 8-bit kernel's column order
    assert torch.allclose(xs, scale)
    run_sums = (q.reshape(3, nr, 64) * scale[..., None]).sum(-1)
    assert torch.allclose(xsum, run_sums, rtol=1e-5, atol=1e-4)
    assert torch.allclose(native.quant_x_vnni(x, 576)[2][:, 0], run_sums.sum(-1), rtol=1e-5, atol=1e-3)  # per channel


@pytest.mark.parametrize("gs", [64, 128, -1])
def test_vnni_matches_reference_on_its_own_rounded_activations(gs):
    """With x replaced by its int8 rounding, the only error left is bf16 output rounding: the VNNI
    arithmetic (dot products, scales, zero-point correction) is exact up to fp32 summation order."""
    _vnni_or_skip()
    k = 1152 if gs == 128 else 576  # 576: 9 runs of 64, so the pair loop and the trailing odd run
    for m in (1, 4, 6):
        qw = make_qweight(40, k, QuantScheme(4, gs), seed=m, bias=True)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).bfloat16()
        q, scale = _quant_x_int8(x)
        xr = (q.reshape(m, -1, 64) * scale[..., None]).reshape(m, k)
        ref = ReferenceKernel(qw, torch.device("cpu"), torch.float32).forward(xr)
        out = VnniInt4Kernel(qw, torch.device("cpu"), torch.bfloat16).forward(x).float()
        assert float((out - ref).norm() / ref.norm()) < 2**-8  # bf16 output rounding: at most 2^-8 relative


def test_vnni_declines_with_reasons():
    g32 = KernelSpec(QuantScheme(4, 32), in_features=576, out_features=64, dtype=torch.bfloat16)
    assert "64 columns" in VnniInt4Kernel.can_implement(g32)
    fp32 = KernelSpec(QuantScheme(4, 64), in_features=576, out_features=64, dtype=torch.float32)
    assert "float32" in VnniInt4Kernel.can_implement(fp32)


def test_vnni_probe_reason_without_avx512(monkeypatch):
    """On an AVX2-only CPU the probe names the missing flags (the build itself never runs there)."""
    from lowbit import cpuinfo as core_cpuinfo
    from lowbit_cpu import native

    monkeypatch.setattr(core_cpuinfo, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c"}))
    monkeypatch.setattr(native.cpuinfo, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c"}))
    reason = native.vnni_unavailable_reason()
    assert reason is not None and "avx512_vnni" in reason


def test_vnni_prefill_path_and_act_order(monkeypatch):
    """From PREFILL_MIN_BATCH rows on the VNNI kernel runs the shared tiled path (bf16 output error only)."""
    _vnni_or_skip()
    monkeypatch.setenv("LOWBIT_CPU_PREFILL_MIN_BATCH", "4")
    for batch in (3, 4, 20):
        err = _rel_err(VnniInt4Kernel, QuantScheme(4, 64, act_order=True), batch, torch.bfloat16, seed=batch)
        assert err <= DEFAULT_RTOL[torch.bfloat16], (batch, err)


@pytest.mark.parametrize("lookup", [False, True], ids=["avx2", "avx512-lookup"])
def test_bf16_tile_dequant_equals_fp32_then_cast(lookup):
    """The prefill tiles dequantized straight to bf16 hold exactly the fp32 dequantization rounded to bf16."""
    if lookup:
        _vnni_or_skip()
    from lowbit_cpu import native

    for gs, k in ((64, 576), (128, 1024), (-1, 576)):
        qw = make_qweight(48, k, QuantScheme(4, gs), seed=k)
        kern = Avx2Int4Kernel(qw, torch.device("cpu"), torch.bfloat16)
        f32 = native.dequant_rows(kern.packed, kern.scales, kern.zs, torch.empty(40, k), 8, 48, kern.group, 1)
        bf = native.dequant_rows(kern.packed, kern.scales, kern.zs, torch.empty(40, k, dtype=torch.bfloat16), 8, 48,
                                 kern.group, 1, lookup)
        assert torch.equal(bf, f32.bfloat16()), gs
        assert torch.allclose(f32, qw.dequantize(torch.float32)[8:48], rtol=1e-6, atol=1e-6)


def test_quantize_lm_head_at_load():
    """nn.quantize_lm_head: the lm_head becomes a QuantLinear whose logits stay close to the float ones
    (int8 per channel: well under 1 % relative error), a tied config is copied, bad modes are refused."""
    from lowbit.errors import LowbitError
    from lowbit.run.nn import QuantLinear, quantize_lm_head
    from lowbit.testing.models import tiny_llama

    model = tiny_llama(seed=0).eval()
    ids = torch.randint(0, 384, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = model(ids).logits.float()
        quantize_lm_head(model, "int8", dtype=torch.float32)
        assert isinstance(model.lm_head, QuantLinear) and model.lm_head.scheme.bits == 8
        out = model(ids).logits.float()
    assert float((out - ref).norm() / ref.norm()) < 1e-2
    tied = tiny_llama(seed=0, tie_word_embeddings=True)
    cfg = tied.config
    quantize_lm_head(tied, "int4", dtype=torch.float32)
    assert cfg.tie_word_embeddings and not tied.config.tie_word_embeddings  # the shared config is untouched
    with pytest.raises(LowbitError, match="not one of"):
        quantize_lm_head(tiny_llama(seed=0), "int3")


def test_vnni_int8_prefill_and_decode_agree(monkeypatch):
    """Decode (VNNI) and prefill (bf16 matmul over dequantized row blocks) paths of cpu.vnni_int8 both
    stay within the bf16 tolerance, with a bias and act-order."""
    _vnni_or_skip()
    for path in ("1000000", "1"):
        monkeypatch.setenv("LOWBIT_CPU_PREFILL_MIN_BATCH", path)
        for batch in (1, 6):
            err = _rel_err(VnniInt8Kernel, QuantScheme(8, 64, act_order=True), batch, torch.bfloat16, seed=batch)
            assert err <= DEFAULT_RTOL[torch.bfloat16], (path, batch, err)


@pytest.mark.parametrize("scheme", [QuantScheme(4, 32), QuantScheme(4, -1), QuantScheme(4, 128, sym=True)])
def test_ipex_gptq_v1_packing_decodes_back(scheme):
    """The IPEX kernel's GPTQ-v1 packing (codes along K, zeros stored as z - 1 along N) unpacks to
    the same codes and zeros, edge values included."""
    from lowbit.packing import unpack_bits
    from lowbit.testing import random_qweight
    from lowbit_cpu.kernels.ipex_woq import pack_gptq_v1

    qw = random_qweight(64, 256, scheme, seed=3, edges=True)
    qweight, qzeros, scales = pack_gptq_v1(qw)
    assert qweight.shape == (256 // 8, 64) and qzeros.shape == (qw.num_groups, 64 // 8)
    assert torch.equal(unpack_bits(qweight.t().contiguous(), 4), qw.codes)
    assert torch.equal((unpack_bits(qzeros, 4).to(torch.int16) + 1) & 0xF, qw.zeros.t().to(torch.int16))
    assert torch.equal(scales, qw.scales.t().half())
