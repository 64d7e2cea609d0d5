"""pack_bits' byte path (2, 4 and 8 bits) against its word path, and unpack_bits inverting both."""

from __future__ import annotations

import pytest
import torch

from lowbit.packing import _pack_bytes, _pack_words, block, pack_bits, unpack_bits


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("lead", [(), (3,), (2, 5)])
def test_paths_agree_and_invert(bits, lead):
    nv, _ = block(bits)
    g = torch.Generator().manual_seed(bits * 10 + len(lead))
    values = torch.randint(0, 1 << bits, (*lead, nv * 6), generator=g, dtype=torch.int32)
    words = pack_bits(values, bits)
    assert words.dtype == torch.int32 and list(words.shape) == [*lead, nv * 6 * bits // 32]
    assert torch.equal(words, _pack_words(values, bits))
    if bits in (2, 4, 8):
        assert torch.equal(_pack_bytes(values.to(torch.uint8), bits), words)
    assert torch.equal(unpack_bits(words, bits), values.to(torch.uint8))


def test_lsb_first_golden():
    """value i of a 4-bit word sits at bits 4i..4i+3 (formats.md: LSB-first)."""
    values = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8])
    assert int(pack_bits(values, 4)[0]) == 0x87654321 - (1 << 32)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_strided_values_and_no_aliasing(bits):
    """A transposed (non-contiguous) input packs like its contiguous copy, and the words never share
    memory with the input."""
    nv, _ = block(bits)
    g = torch.Generator().manual_seed(bits)
    base = torch.randint(0, 1 << bits, (nv * 4, 6), generator=g, dtype=torch.uint8)
    values = base.T  # [6, nv * 4], strides (1, 6)
    words = pack_bits(values, bits)
    assert torch.equal(words, _pack_words(values.contiguous(), bits))
    before = words.clone()
    base.zero_()
    assert torch.equal(words, before)
