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
