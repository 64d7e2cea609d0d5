"""The triton-kpack layout: golden words, pack∘unpack identity, act-order bookkeeping, errors."""

from __future__ import annotations

import pytest
import torch

from lowbit import QuantScheme, UnsupportedSchemeError
from lowbit.errors import CheckpointError
from lowbit.plugins import registry
from lowbit.testing import random_qweight
from lowbit_cuda.packing import TritonPacker, pack, pack_codes, unpack, unpack_codes


def test_golden_words():
    """The worked examples of the packing module's docstring."""
    four = pack_codes(torch.tensor([[3], [15], [0], [7], [1], [2], [9], [4]], dtype=torch.uint8), 4)
    assert four.tolist() == [[0x492170F3]] == [[1226928371]]
    eight = pack_codes(torch.tensor([[1], [2], [3], [250]], dtype=torch.uint8), 8)
    assert eight.tolist() == [[-100466175]] and (eight.item() & 0xFFFFFFFF) == 0xFA030201
    two = pack_codes(torch.tensor([[1], [2], [3], [0]] + [[0]] * 12, dtype=torch.uint8), 2)
    assert two.tolist() == [[0b00111001]]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("k", [8, 90, 256])
def test_codes_round_trip(bits, k):
    codes = torch.randint(0, 1 << bits, (k, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(k))
    words = pack_codes(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (-(-k // (32 // bits)), 5)
    assert torch.equal(unpack_codes(words, bits, k), codes)


@pytest.mark.parametrize(
    "scheme",
    [QuantScheme(4, 64), QuantScheme(4, 32, sym=True, act_order=True), QuantScheme(8, -1), QuantScheme(2, 128, act_order=True)],
    ids=lambda s: s.describe().replace(" ", "-"),
)
def test_pack_unpack_identity(scheme):
    qw = random_qweight(24, 256, scheme, bias=True, seed=scheme.bits)
    p = pack(qw)
    assert (p.perm is not None) == scheme.act_order and p.g_idx is None
    assert p.sym == scheme.sym and p.scales.shape == (qw.num_groups, 24)
    back = unpack(p, scheme)
    assert back.equal(qw) and torch.equal(back.bias, qw.bias)
    # and through the registered Packer, as named tensors
    packer = registry("packers").get("triton-kpack")()
    assert back.equal(packer.unpack(packer.pack(qw), scheme, 256, 24))


def test_act_order_makes_groups_contiguous():
    qw = random_qweight(8, 128, QuantScheme(4, 32, act_order=True), seed=1)
    p = pack(qw)
    assert torch.equal(qw.g_idx[p.perm.long()].long(), torch.arange(128) // 32)
    # the packed codes are the original columns in perm order
    assert torch.equal(unpack_codes(p.qweight, 4, 128).t(), qw.codes[:, p.perm.long()])


def test_uneven_groups_keep_sorted_g_idx():
    g_idx = torch.tensor([0, 1, 1, 1, 1, 1, 1, 1] * 8, dtype=torch.int32)  # groups of 8 and 56 columns
    qw = random_qweight(4, 64, QuantScheme(4, 32, act_order=True), g_idx=g_idx)
    p = pack(qw)
    assert p.g_idx is not None and bool((p.g_idx[1:] >= p.g_idx[:-1]).all())
    assert unpack(p, qw.scheme).equal(qw)


def test_sym_with_stray_zeros_keeps_zeros():
    """A 'symmetric' weight whose zeros are not all 2**(bits-1) is packed with its zeros."""
    qw = random_qweight(4, 64, QuantScheme(4, 32, sym=True))
    qw.zeros[0, 0] = 3
    assert pack(qw).zeros is not None


def test_unsupported_bits():
    qw = random_qweight(4, 64, QuantScheme(3, 32))
    with pytest.raises(UnsupportedSchemeError, match=r"holds bits \(2, 4, 8\).*got 3"):
        pack(qw)


def test_packer_rejects_foreign_tensors():
    with pytest.raises(CheckpointError, match="needs tensors qweight and scales"):
        TritonPacker().unpack({"weight": torch.zeros(2)}, QuantScheme(4, 32), 64, 4)
    with pytest.raises(CheckpointError, match=r"qweight shape \[3, 4\] != \[8, 4\]"):
        TritonPacker().unpack({"qweight": torch.zeros(3, 4), "scales": torch.zeros(2, 4)}, QuantScheme(4, 32), 64, 4)
