"""The Packer interface: one layout ↔ QuantizedWeight, with unpack(pack(w)) == w exactly."""

from __future__ import annotations

from typing import ClassVar

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
