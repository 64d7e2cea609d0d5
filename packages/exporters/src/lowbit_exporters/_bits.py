"""LSB-first bitstreams of unsigned integers in int32 words (formats.md §0 and §2.2).

Values ``v0, v1, …`` of ``b`` bits sit at bit offsets ``0, b, 2b, …`` of one little-endian
integer; word ``w`` holds bits ``32w … 32w+31``. For ``b`` in 2/4/8 that is 16/8/4 whole values per
word; for ``b = 3`` a block of 32 values fills exactly 3 words and v10 and v21 straddle word
boundaries. Words are returned as int32 (two's complement bit patterns, safetensors ``I32``).
"""

from __future__ import annotations

from math import gcd

import numpy as np
import torch

_MASK32 = np.uint64(0xFFFFFFFF)


def block(bits: int) -> tuple[int, int]:
    """(values, words) of the smallest run that fills whole words: 2→(16,1), 3→(32,3), 4→(8,1), 8→(4,1)."""
    g = gcd(32, bits)
    return 32 // g, bits // g


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``values`` (any integer dtype, ``[..., L]``, each in ``[0, 2**bits)``) along the last dim
    into int32 ``[..., L * bits / 32]``. ``L`` must be a multiple of ``block(bits)[0]``."""
    nv, nw = block(bits)
    *lead, length = values.shape
    if length % nv:
        raise ValueError(f"{bits}-bit packing needs a multiple of {nv} values, got {length}")
    v = _np(values).astype(np.uint64).reshape(*lead, length // nv, nv)
    words = np.zeros((*lead, length // nv, nw), dtype=np.uint64)
    for i in range(nv):
        off = i * bits
        w, sh = divmod(off, 32)
        words[..., w] |= (v[..., i] << np.uint64(sh)) & _MASK32
        if sh + bits > 32:  # the value straddles into the next word (3-bit only)
            words[..., w + 1] |= v[..., i] >> np.uint64(32 - sh)
    out = words.astype(np.uint32).reshape(*lead, length // nv * nw)
    return torch.from_numpy(out.view(np.int32).copy())


def unpack_bits(words: torch.Tensor, bits: int, length: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: int32 ``[..., W]`` → uint8 ``[..., W * 32 / bits]`` (first
    ``length`` values if given)."""
    nv, nw = block(bits)
    *lead, nwords = words.shape
    if nwords % nw:
        raise ValueError(f"{bits}-bit unpacking needs a multiple of {nw} words, got {nwords}")
    w64 = _np(words).astype(np.int32).view(np.uint32).astype(np.uint64).reshape(*lead, nwords // nw, nw)
    mask = np.uint64((1 << bits) - 1)
    vals = np.zeros((*lead, nwords // nw, nv), dtype=np.uint64)
    for i in range(nv):
        w, sh = divmod(i * bits, 32)
        v = w64[..., w] >> np.uint64(sh)
        if sh + bits > 32:
            v |= w64[..., w + 1] << np.uint64(32 - sh)
        vals[..., i] = v & mask
    out = vals.astype(np.uint8).reshape(*lead, nwords // nw * nv)
    if length is not None:
        out = out[..., :length]
    return torch.from_numpy(np.ascontiguousarray(out))
