"""The Packer interface (one layout ↔ QuantizedWeight, with unpack(pack(w)) == w exactly) and the
one bit-packing primitive every layout builds on.

:func:`pack_bits` writes LSB-first bitstreams of unsigned integers in int32 words (formats.md §0 and
§2.2): values ``v0, v1, …`` of ``b`` bits sit at bit offsets ``0, b, 2b, …`` of one little-endian
integer; word ``w`` holds bits ``32w … 32w+31``. For ``b`` in 2/4/8 that is 16/8/4 whole values per
word; for ``b = 3`` a block of 32 values fills exactly 3 words and v10 and v21 straddle word
boundaries. Words are int32 (two's complement bit patterns, safetensors ``I32``). AutoAWQ, GPTQ and
the Triton kernels' layout differ only in what they pack along which dimension.
"""

from __future__ import annotations

import sys
from math import gcd
from typing import ClassVar

import numpy as np
import torch

from .qweight import QuantizedWeight
from .scheme import QuantScheme


class Packer:
    """Subclass per layout; register with ``lowbit_register_packers``.

    ``pack`` returns the tensors of one linear under their short names (``qweight``, ``qzeros``,
    ...); ``unpack`` inverts it given the scheme and the layer's shape.
    """

    name: ClassVar[str] = ""
    supported_bits: ClassVar[tuple[int, ...]] = (2, 3, 4, 8)
    supported_group_sizes: ClassVar[tuple[int, ...]] = (32, 64, 128, -1)
    supports_act_order: ClassVar[bool] = True

    @classmethod
    def check(cls, scheme: QuantScheme, in_features: int, out_features: int) -> str | None:
        """None if this layout can hold the scheme at this shape, else why not."""
        if scheme.bits not in cls.supported_bits:
            return f"{cls.name} holds bits {cls.supported_bits}, got {scheme.bits}"
        if scheme.group_size not in cls.supported_group_sizes:
            return f"{cls.name} holds group sizes {cls.supported_group_sizes}, got {scheme.group_size}"
        if scheme.act_order and not cls.supports_act_order:
            return f"{cls.name} cannot hold act-order (g_idx)"
        return None

    def pack(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def unpack(
        self, tensors: dict[str, torch.Tensor], scheme: QuantScheme, in_features: int, out_features: int
    ) -> QuantizedWeight:
        raise NotImplementedError



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
    if bits in (2, 4, 8) and sys.byteorder == "little":
        return _pack_bytes(values, bits)
    return _pack_words(values, bits)


def _pack_bytes(values: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`pack_bits` for widths that divide a byte, on a little-endian host: each byte holds
    ``8 / bits`` values, the first in its low bits, so the bytes read as int32 words are the
    LSB-first words (one byte per value of temporaries, where the word loop widens to uint64)."""
    *lead, length = values.shape
    per = 8 // bits
    v = values.detach().cpu().to(torch.uint8).contiguous().reshape(*lead, length // per, per)
    b = v[..., 0].clone(memory_format=torch.contiguous_format)  # a new tensor, never a view of ``values``
    for i in range(1, per):
        b |= v[..., i] << (bits * i)
    return b.reshape(*lead, length // per).view(torch.int32)


def _pack_words(values: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`pack_bits` for any width (3 and 5–7 bits straddle words), in uint64 arithmetic."""
    nv, nw = block(bits)
    *lead, length = values.shape
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
    if bits == 4 and sys.byteorder == "little":  # the same values from the words' bytes: low nibble first
        b = words.detach().cpu().contiguous().view(torch.uint8)
        out = torch.stack([b & 15, b >> 4], dim=-1).reshape(*lead, nwords * 8)
        return (out if length is None else out[..., :length]).contiguous()
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
