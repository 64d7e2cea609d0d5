"""QuantizedWeight: the one canonical, unpacked form of a quantized linear weight.

Every algorithm produces it, every packer maps it to and from a format, every kernel prepares
from it. Orientation follows ``nn.Linear``: ``codes`` is ``[N, K]`` (out, in).

Dequantization (formats.md §0.1)::

    W[n, k] = float32(codes[n, k] - zeros[n, g(k)]) * float32(scales[n, g(k)])
    g(k) = g_idx[k]  if g_idx is not None  else  k // group_size   (0 for per channel)

A last group may be partial (``NG = ceil(K / group_size)``), as in GPTQModel's checkpoints of
models whose K the group size does not divide; lowbit's own quantizers never make one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import CheckpointError
from .scheme import QuantScheme


@dataclass
class QuantizedWeight:
    """:param codes: ``uint8 [N, K]``, unsigned codes in ``[0, 2**bits - 1]``.
    :param scales: ``float16 [N, NG]`` (the dtype every consumer format stores).
    :param zeros: ``uint8 [N, NG]`` integer zero points in ``[0, 2**bits - 1]``;
        ``2**(bits-1)`` everywhere for a symmetric scheme.
    :param scheme: the QuantScheme it was made with.
    :param g_idx: ``int32 [K]`` group of each input column, or None for ``k // group_size``.
    :param bias: optional float ``[N]`` bias of the linear layer.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    scheme: QuantScheme
    g_idx: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    @property
    def num_groups(self) -> int:
        return self.scales.shape[1]

    def validate(self) -> None:
        """Raise CheckpointError when the tensors disagree with each other or the scheme, or the
        scales are not finite. Every reader builds QuantizedWeights, so this runs on every read of
        every format."""
        if self.codes.dim() != 2 or self.codes.dtype != torch.uint8:
            raise CheckpointError("inconsistent quantized weight: codes must be uint8 [N, K], got "
                                  f"{self.codes.dtype} {list(self.codes.shape)}")
        check_parts(*self.codes.shape, self.scales, self.zeros, self.scheme, self.g_idx, self.bias, self.codes)

    def group_index(self) -> torch.Tensor:
        """``int64 [K]``: the group of every input column."""
        if self.g_idx is not None:
            return self.g_idx.long()
        k = self.in_features
        return torch.arange(k) // self.scheme.group_width(k)

    def has_trivial_g_idx(self) -> bool:
        """True when g_idx is absent or equal to ``k // group_size`` (no act-order permutation)."""
        if self.g_idx is None:
            return True
        k = self.in_features
        return bool(torch.equal(self.g_idx.long(), torch.arange(k) // self.scheme.group_width(k)))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float ``[N, K]`` weight, computed in fp32 then cast once to ``dtype``."""
        n, k = self.codes.shape
        if self.g_idx is None and k == self.num_groups * self.scheme.group_width(k):
            # whole groups by broadcasting: one [N, K] float temporary, not four
            w = self.codes.float().reshape(n, self.num_groups, -1)
            w.sub_(self.zeros.float()[..., None]).mul_(self.scales.float()[..., None])
            return w.reshape(n, k).to(dtype)
        gi = self.group_index().to(self.codes.device)
        z = self.zeros.float()[:, gi]
        s = self.scales.float()[:, gi]
        return ((self.codes.float() - z) * s).to(dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors that define it (for hashing, saving and comparing)."""
        out = {"codes": self.codes, "scales": self.scales, "zeros": self.zeros}
        if self.g_idx is not None:
            out["g_idx"] = self.g_idx
        if self.bias is not None:
            out["bias"] = self.bias
        return out

    def equal(self, other: QuantizedWeight) -> bool:
        """Bit-exact equality of codes, scales, zeros and the effective g_idx."""
        return self.diff(other) == []

    def diff(self, other: QuantizedWeight) -> list[str]:
        """Human-readable list of where two weights differ; empty when they decode identically."""
        out = []
        if self.scheme.bits != other.scheme.bits or self.scheme.group_size != other.scheme.group_size:
            return [f"scheme {self.scheme.describe()} vs {other.scheme.describe()}"]
        if self.codes.shape != other.codes.shape:
            return [f"shape {list(self.codes.shape)} vs {list(other.codes.shape)}"]
        for name, a, b in (
            ("codes", self.codes, other.codes),
            ("scales", self.scales, other.scales),
            ("zeros", self.zeros, other.zeros),
            ("g_idx", self.group_index(), other.group_index()),
        ):
            if a.dtype != b.dtype or not torch.equal(a, b):
                if a.dtype != b.dtype:
                    out.append(f"{name}: dtype {a.dtype} vs {b.dtype}")
                else:
                    ne = (a != b).nonzero()
                    out.append(f"{name}: {ne.shape[0]} of {a.numel()} differ, first at {ne[0].tolist()}")
        return out


def check_parts(n: int, k: int, scales: torch.Tensor, zeros: torch.Tensor, scheme: QuantScheme,
                g_idx: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                codes: torch.Tensor | None = None) -> None:
    """:meth:`QuantizedWeight.validate`'s checks of an ``[n, k]`` weight's parts; ``codes`` None: all but the
    codes' range (a reader that converts codes as it streams them checks those itself)."""
    ng = scheme.num_groups(k) if k else None
    problems = []
    if list(scales.shape) != [n, ng]:
        problems.append(f"scales shape {list(scales.shape)} != [N={n}, NG={ng}]")
    if list(zeros.shape) != [n, ng]:
        problems.append(f"zeros shape {list(zeros.shape)} != [N={n}, NG={ng}]")
    if g_idx is not None and list(g_idx.shape) != [k]:
        problems.append(f"g_idx shape {list(g_idx.shape)} != [K={k}]")
    if bias is not None and list(bias.shape) != [n]:
        problems.append(f"bias shape {list(bias.shape)} != [N={n}]")
    if not problems and not scales.is_floating_point():
        problems.append(f"scales must be float, got {scales.dtype}")
    elif not problems and scales.numel() and not bool(torch.isfinite(scales).all()):
        problems.append("scales hold NaN or Inf (they would decode to NaN weights and empty output)")
    if not problems and codes is not None and codes.numel() and int(codes.max()) > scheme.maxq:
        problems.append(f"codes exceed {scheme.maxq} for {scheme.bits}-bit")
    if not problems and zeros.is_floating_point():
        problems.append(f"zeros must be integers, got {zeros.dtype}")
    elif not problems and zeros.numel() and (int(zeros.max()) > scheme.maxq or int(zeros.min()) < 0):
        problems.append(f"zeros outside [0, {scheme.maxq}] for {scheme.bits}-bit")
    if g_idx is not None and not problems and g_idx.numel():
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= ng:
            problems.append(f"g_idx values outside [0, {ng})")
    if problems:
        raise CheckpointError("inconsistent quantized weight: " + "; ".join(problems))
