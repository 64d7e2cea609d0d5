"""QuantScheme: what a weight quantization is, validated when it is made."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import UnsupportedSchemeError

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128, -1)
#: the API's and the CLI's default: it divides the hidden sizes of common models, 576 of the demo
#: model included, which 128 (AutoAWQ's and GPTQ's usual choice) does not
DEFAULT_GROUP_SIZE = 64


@dataclass(frozen=True)
class QuantScheme:
    """Weight-only integer quantization of a linear layer's ``[N, K]`` weight.

    Granularity (along K, the input dimension):

    ============  =================================================
    group_size    one (scale, zero) pair per
    ============  =================================================
    32/64/128     output row and run of ``group_size`` input columns
    -1            output row (per channel)
    ============  =================================================

    :param bits: code width, one of 2, 3, 4, 8.
    :param group_size: 32, 64 (the default), 128, or -1 for per channel.
    :param sym: symmetric codes (zero fixed at ``2**(bits-1)``) instead of a free zero point.
    :param act_order: quantize input columns in order of decreasing Hessian diagonal (GPTQ's
        desc_act); the group of each column is then given by ``g_idx``.
    """

    bits: int = 4
    group_size: int = DEFAULT_GROUP_SIZE
    sym: bool = False
    act_order: bool = False
    version: int = 1

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise UnsupportedSchemeError(
                f"bits={self.bits} is not supported; supported: {', '.join(map(str, SUPPORTED_BITS))}. "
                "Pass --bits 4 (or 2, 3, 8)."
            )
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise UnsupportedSchemeError(
                f"group_size={self.group_size} is not supported; supported: 32, 64, 128, -1 (per channel). "
                "Pass --group-size 64 (or 32, 128, -1)."
            )

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    @property
    def per_channel(self) -> bool:
        """One group per output row (``group_size`` -1): the one place the sentinel is read."""
        return self.group_size == -1

    def group_width(self, in_features: int) -> int:
        """Input columns per group: ``group_size``, or all of them per channel."""
        return in_features if self.per_channel else self.group_size

    def num_groups(self, in_features: int) -> int:
        """Groups along K; a last, partial group counts (GPTQModel writes K=576 at group 128 as 5
        groups; lowbit reads such checkpoints but quantizes only when the group size divides K)."""
        return -(-in_features // self.group_width(in_features))

    def check_shape(self, in_features: int, name: str = "layer") -> None:
        """Raise if ``group_size`` does not divide ``in_features``."""
        if in_features % self.group_width(in_features):
            divisors = sorted((g for g in SUPPORTED_GROUP_SIZES if g == -1 or in_features % g == 0), reverse=True)
            divisors = [g for g in divisors if g != -1] + [-1]
            raise UnsupportedSchemeError(
                f"group_size={self.group_size} does not divide {name}'s {in_features} input features; "
                f"group sizes that fit: {', '.join(map(str, divisors))}. Pass --group-size {divisors[0]}."
            )

    def describe(self) -> str:
        g = "per-channel" if self.per_channel else f"g{self.group_size}"
        return f"w{self.bits} {g} {'sym' if self.sym else 'asym'}{' act-order' if self.act_order else ''}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QuantScheme:
        known = {k: d[k] for k in ("bits", "group_size", "sym", "act_order", "version") if k in d}
        return cls(**known)
