"""Golden values of formats.md (§1.2, §1.3, §2.3, §2.5, §4.5, §7) for every writer."""

from __future__ import annotations

import struct

import pytest
import torch

from lowbit import QuantizedWeight, QuantScheme
from lowbit.packing import pack_bits, unpack_bits
from lowbit_exporters.autoawq import AwqGemmPacker, AwqGemvPacker, gemv_zeros_width
from lowbit_exporters.gptq import GPTQPacker, GPTQv2Packer
from lowbit_exporters.xft import xft_matrix


def u32(t: torch.Tensor) -> list[int]:
    return [int(v) & 0xFFFFFFFF for v in t.flatten().tolist()]


def fp16_bits(t: torch.Tensor) -> list[int]:
    return [int(v) & 0xFFFF for v in t.contiguous().view(torch.int16).flatten().tolist()]


# --- AutoAWQ GEMM (§1.2) ------------------------------------------------------------------------

Z0 = [1, 2, 3, 4, 5, 6, 7, 8]
Z1 = [0, 15, 7, 8, 1, 2, 3, 4]
S0 = [0.5, 0.25, 0.125, 0.0625, 0.01, 0.02, 0.03, 0.04]
S1 = [1.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]


def awq_example(k: int = 64, group_size: int = 32) -> QuantizedWeight:
    """§1.2's example (Qt[k][n] = (n+k) % 16, two groups) tiled along K to a group size lowbit holds:
    the rows and group rows the spec lists are unchanged."""
    n = 8
    kk = torch.arange(k)[None, :]
    nn_ = torch.arange(n)[:, None]
    codes = ((nn_ + kk) % 16).to(torch.uint8)  # [N, K]
    zeros = torch.tensor([Z0, Z1], dtype=torch.uint8).t().contiguous()  # [N, NG]
    scales = torch.tensor([S0, S1], dtype=torch.float16).t().contiguous()
    return QuantizedWeight(codes=codes, scales=scales, zeros=zeros, scheme=QuantScheme(4, group_size))


def test_awq_gemm_golden_words():
    t = AwqGemmPacker().pack(awq_example())
    assert list(t["qweight"].shape) == [64, 1] and list(t["qzeros"].shape) == [2, 1]
    assert u32(t["qweight"][:8]) == [0x75316420, 0x86427531, 0x97538642, 0xA8649753,
                                     0xB975A864, 0xCA86B975, 0xDB97CA86, 0xECA8DB97]
    assert u32(t["qzeros"]) == [0x86427531, 0x428F3170]
    assert fp16_bits(t["scales"][0]) == [0x3800, 0x3400, 0x3000, 0x2C00, 0x211F, 0x251F, 0x27AE, 0x291F]
    assert fp16_bits(t["scales"][1]) == [0x3C00, 0x2E66, 0x3266, 0x34CD, 0x3666, 0x3800, 0x38CD, 0x399A]


def test_awq_gemm_golden_dequant_through_reader():
    qw = awq_example()
    back = AwqGemmPacker().unpack(AwqGemmPacker().pack(qw), qw.scheme, 64, 8)
    row = back.dequantize(torch.float16)[:, 32 + 4]  # k = 4 of group 1: q = [4..11]
    assert fp16_bits(row) == [0x4400, 0xBC00, 0xB266, 0xB4CD, 0x4199, 0x4300, 0x4433, 0x44E7]
    assert row.tolist() == [4.0, -1.0, -0.199951171875, -0.300048828125, 2.798828125, 3.5, 4.19921875, 4.90234375]


def test_awq_row_vs_gptq_row():
    # §2.5 / §7: the same codes [0..7] pack to 0x75316420 in AWQ-GEMM and 0x76543210 in GPTQ/GEMV
    assert u32(AwqGemmPacker().pack(awq_example())["qweight"][0]) == [0x75316420]
    assert u32(pack_bits(torch.arange(8), 4)) == [0x76543210]


# --- AutoAWQ GEMV (§1.3) ------------------------------------------------------------------------

def test_gemv_zeros_width():
    assert gemv_zeros_width(4096, 128) == 4
    assert gemv_zeros_width(11008, 128) == 11
    assert gemv_zeros_width(64, 32) == 4


def test_awq_gemv_golden():
    row = [1, 6, 11, 0, 5, 10, 15, 4, 9, 14, 3, 8, 13, 2, 7, 12]
    codes = torch.tensor(row * 4, dtype=torch.uint8)[None, :].repeat(8, 1)  # N=8, K=64
    qw = QuantizedWeight(codes=codes, scales=torch.full((8, 2), 0.5, dtype=torch.float16),
                         zeros=torch.tensor([[2, 9]] * 8, dtype=torch.uint8), scheme=QuantScheme(4, 32))
    t = AwqGemvPacker().pack(qw)
    assert list(t["qweight"].shape) == [8, 8]
    assert u32(t["qweight"][0, :2]) == [0x4FA50B61, 0xC72D83E9]
    assert list(t["qzeros"].shape) == [8, 4] and u32(t["qzeros"][0]) == [0x00000092, 0, 0, 0]
    assert list(t["scales"].shape) == [8, 32]
    assert t["scales"][0, :2].tolist() == [0.5, 0.5] and not t["scales"][:, 2:].any()


def test_awq_gemv_padding_11008():
    qw = QuantizedWeight(codes=torch.zeros(8, 11008, dtype=torch.uint8), scales=torch.ones(8, 86, dtype=torch.float16),
                         zeros=torch.ones(8, 86, dtype=torch.uint8), scheme=QuantScheme(4, 128))
    t = AwqGemvPacker().pack(qw)
    assert list(t["scales"].shape) == [8, 88] and not t["scales"][:, 86:].any()
    assert list(t["qzeros"].shape) == [8, 11]


# --- GPTQ (§2.3, §2.5) --------------------------------------------------------------------------

def gptq_tile(scheme: QuantScheme, zeros_row=None) -> QuantizedWeight:
    kk = torch.arange(32)[None, :]
    nn_ = torch.arange(32)[:, None]
    codes = ((nn_ + kk) % 16).to(torch.uint8)
    if zeros_row is None:
        zeros = torch.full((32, 1), 1 << (scheme.bits - 1), dtype=torch.uint8)
    else:
        zeros = torch.tensor(zeros_row * 4, dtype=torch.uint8)[:, None]
    return QuantizedWeight(codes=codes, scales=torch.ones(32, 1, dtype=torch.float16), zeros=zeros, scheme=scheme)


def test_gptq_4bit_golden():
    t = GPTQPacker().pack(gptq_tile(QuantScheme(4, -1, sym=True)))
    assert list(t["qweight"].shape) == [4, 32] and list(t["qzeros"].shape) == [1, 4]
    assert u32(t["qweight"][0, :2]) == [0x76543210, 0x87654321]
    assert u32(t["qweight"][1, :2]) == [0xFEDCBA98, 0x0FEDCBA9]
    assert u32(t["qzeros"]) == [0x77777777] * 4
    assert u32(GPTQv2Packer().pack(gptq_tile(QuantScheme(4, -1, sym=True)))["qzeros"]) == [0x88888888] * 4
    assert t["g_idx"].dtype == torch.int32 and not t["g_idx"].any()


def test_gptq_zeros_1_to_8():
    qw = gptq_tile(QuantScheme(4, -1), zeros_row=[1, 2, 3, 4, 5, 6, 7, 8])
    assert u32(GPTQPacker().pack(qw)["qzeros"][0, :1]) == [0x76543210]
    assert u32(GPTQv2Packer().pack(qw)["qzeros"][0, :1]) == [0x87654321]


def test_gptq_v1_zero_zero_row():
    # §2.3: the ideal per-field v1 of [5,6,0,8,9,10,11,12] is 0xBA987F54; lowbit refuses to write it (readers
    # disagree on it) but reads it per field, back to zero 0
    qw = gptq_tile(QuantScheme(4, -1), zeros_row=[5, 6, 0, 8, 9, 10, 11, 12])
    with pytest.raises(Exception, match="gptq-v2"):
        GPTQPacker().pack(qw)
    words = torch.tensor([[0xBA987F54 - (1 << 32)] * 4], dtype=torch.int32)
    t = GPTQv2Packer().pack(qw)
    t["qzeros"] = words
    back = GPTQPacker().unpack(t, qw.scheme, 32, 32)
    assert back.zeros[:8, 0].tolist() == [5, 6, 0, 8, 9, 10, 11, 12]


@pytest.mark.parametrize("bits, first_words", [
    (2, [0x39393939]), (8, [0x100B0601]), (3, [0xF19D50F1, 0x50F19D50, 0x9D50F19D]), (4, None)])
def test_gptq_other_widths_golden(bits, first_words):
    k = 32
    col = ((5 * torch.arange(k) + 1) % (1 << bits)).to(torch.uint8)
    codes = col[None, :].repeat(32, 1)
    scheme = QuantScheme(bits, -1, sym=True)
    qw = QuantizedWeight(codes=codes, scales=torch.ones(32, 1, dtype=torch.float16),
                         zeros=torch.full((32, 1), 1 << (bits - 1), dtype=torch.uint8), scheme=scheme)
    t = GPTQPacker().pack(qw)
    assert list(t["qweight"].shape) == [k * bits // 32, 32]
    if first_words:
        assert u32(t["qweight"][: len(first_words), 0]) == first_words
    sym_zero = {2: [0x55555555], 3: [0xDB6DB6DB, 0xB6DB6DB6, 0x6DB6DB6D], 4: [0x77777777], 8: [0x7F7F7F7F]}[bits]
    assert u32(t["qzeros"][0, : len(sym_zero)]) == sym_zero


def test_3bit_straddle_bits():
    # v10 straddles words 0/1, v21 words 1/2 (§2.2)
    vals = torch.zeros(32, dtype=torch.uint8)
    vals[10] = 0b101
    vals[21] = 0b011
    w = u32(pack_bits(vals, 3))
    assert w[0] == (0b01 << 30) and w[1] == (0b1 | (0b1 << 31)) and w[2] == 0b01
    assert unpack_bits(pack_bits(vals, 3), 3).tolist() == vals.tolist()


# --- xFT (§4.5) ---------------------------------------------------------------------------------

def test_xft_uint4_golden():
    codes_kn = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]], dtype=torch.uint8)  # [K=2, N=4]
    qw = QuantizedWeight(codes=codes_kn.t().contiguous(),
                         scales=torch.tensor([[0.5], [0.25], [0.125], [0.0625]], dtype=torch.float16),
                         zeros=torch.tensor([[1], [2], [3], [4]], dtype=torch.uint8), scheme=QuantScheme(4, -1))
    t = xft_matrix([qw])
    assert bytes(t["qweight"].numpy().tobytes()) == bytes([0x10, 0x32, 0x54, 0x76])
    assert t["scales"].numpy().tobytes() == bytes.fromhex("0000003f 0000803e 0000003e 0000803d".replace(" ", ""))
    assert t["zeros"].tolist() == [-0.5, -0.5, -0.375, -0.25]
    # w[1][2] = 0.125·6 + (−0.375) = 0.375 = 0.125·(6 − 3)
    assert float(t["scales"][2]) * 6 + float(t["zeros"][2]) == 0.375


def test_xft_int8_golden():
    qw = QuantizedWeight(codes=torch.tensor([[0, 127, 128, 255]], dtype=torch.uint8).t().contiguous(),
                         scales=torch.full((4, 1), 0.5, dtype=torch.float16),
                         zeros=torch.full((4, 1), 128, dtype=torch.uint8), scheme=QuantScheme(8, -1, sym=True))
    t = xft_matrix([qw])
    assert t["qweight"].numpy().tobytes() == bytes([0x80, 0xFF, 0x00, 0x7F])
    assert t["zeros"].numpy().tobytes() == struct.pack("<4f", -0.0, -0.0, -0.0, -0.0)
    assert t["zeros"].numpy().tobytes() == bytes([0, 0, 0, 0x80] * 4)
