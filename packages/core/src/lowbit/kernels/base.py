"""The Kernel interface: what a quantized-linear kernel declares and does.

A kernel states what it supports as data (bits, group sizes, act-order, symmetric or not,
activation dtypes, device types). ``probe(device)`` and ``can_implement(spec)`` return None when
the kernel can run, else a one-line reason. Instances do all repacking once in ``__init__``
(the prepare step); ``forward`` is the hot path only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import LowbitError
from ..qweight import QuantizedWeight
from ..registry import Registry
from ..scheme import QuantScheme


@dataclass(frozen=True)
class KernelSpec:
    """What selection asks a kernel about: one linear layer's quantized weight and activations."""

    scheme: QuantScheme
    in_features: int
    out_features: int
    dtype: torch.dtype
    act_order: bool = False  # a non-trivial g_idx (columns not in k // group_size order)

    @classmethod
    def of(cls, qw: QuantizedWeight, dtype: torch.dtype) -> KernelSpec:
        return cls(qw.scheme, qw.in_features, qw.out_features, dtype, not qw.has_trivial_g_idx())

    def describe(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        return f"{self.scheme.describe()}{' g_idx' if self.act_order else ''} {self.out_features}x{self.in_features} {dt}"


class Kernel:
    """Base class of quantized-linear kernels. Subclass, set the class attributes, implement
    ``__init__`` (prepare) and ``forward``; register with ``lowbit_register_kernels``."""

    name: ClassVar[str] = ""
    priority: ClassVar[int] = 0
    device_types: ClassVar[tuple[str, ...]] = ("cpu",)
    supported_bits: ClassVar[tuple[int, ...]] = (2, 3, 4, 8)
    supported_group_sizes: ClassVar[tuple[int, ...]] = (32, 64, 128, -1)
    supported_dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32, torch.float16, torch.bfloat16)
    supports_act_order: ClassVar[bool] = True
    supports_sym: ClassVar[bool] = True
    supports_asym: ClassVar[bool] = True
    #: runs a weight whose last group is partial (group size not dividing in_features)
    supports_partial_groups: ClassVar[bool] = False
    #: the layout the kernel repacks weights into: a packer's name in the packers' registry (None:
    #: the kernel keeps its own form); :meth:`packer` finds it there, so a plugin's packer is used
    layout: ClassVar[str | None] = None
    description: ClassVar[str] = ""

    @classmethod
    def probe(cls, device: torch.device) -> str | None:
        """None if the kernel can run on ``device`` at all (libraries, hardware), else why not."""
        if device.type not in cls.device_types:
            return f"runs on {'/'.join(cls.device_types)}, not {device.type}"
        return None

    @classmethod
    def can_implement(cls, spec: KernelSpec) -> str | None:
        """None if the kernel can run ``spec``, else why not. Extend with ``super()``."""
        s = spec.scheme
        if s.bits not in cls.supported_bits:
            return f"supports bits {cls.supported_bits}, got {s.bits}"
        if s.group_size not in cls.supported_group_sizes:
            return f"supports group sizes {cls.supported_group_sizes}, got {s.group_size}"
        if spec.in_features % s.group_width(spec.in_features) and not cls.supports_partial_groups:
            return (f"needs group size {s.group_size} to divide in_features {spec.in_features} "
                    "(this checkpoint's last group is partial)")
        if spec.dtype not in cls.supported_dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in cls.supported_dtypes)
            return f"supports activations {names}, got {str(spec.dtype).replace('torch.', '')}"
        if spec.act_order and not cls.supports_act_order:
            return "does not support act-order (g_idx)"
        if s.sym and not cls.supports_sym:
            return "does not support symmetric weights"
        if not s.sym and not cls.supports_asym:
            return "does not support asymmetric weights"
        return None

    @classmethod
    def packer(cls, packers: Registry):
        """The :class:`lowbit.Packer` of :attr:`layout` in ``packers`` (``lowbit.registry("packers")``:
        the installed ones)."""
        if cls.layout is None:
            raise LowbitError(f"kernel {cls.name} declares no layout; set its layout to a registered packer's name.")
        return packers.get(cls.layout)

    def __init__(self, qweight: QuantizedWeight, device: torch.device, dtype: torch.dtype):
        """Prepare: repack ``qweight`` once into the kernel's own layout on ``device``."""
        self.in_features = qweight.in_features
        self.out_features = qweight.out_features
        self.dtype = dtype
        self.device = device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., K]`` in ``dtype`` → ``y [..., N]`` in ``dtype``, bias included."""
        raise NotImplementedError
