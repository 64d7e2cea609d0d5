"""cpu.torch_int8: 8-bit per-channel weights on PyTorch's ``aten._weight_int8pack_mm``.

The op computes ``y = x @ (q8 * s)^T`` with signed int8 ``q8`` and one scale per output
channel. lowbit's unsigned codes with a zero point map to it as ``q8 = q - 128`` and

    y = x @ ((q - z) * s)^T = x @ (q8 * s)^T + sum_k(x) * (128 - z) * s

so an asymmetric zero costs one row sum of x and one scaled add (skipped when symmetric,
where z = 128). Scales are stored in the activation dtype (the op requires it). Grouped 8-bit
weights decline: the op has one scale per output channel.
"""

from __future__ import annotations

import torch

from lowbit.kernels.base import Kernel, KernelSpec
from lowbit.qweight import QuantizedWeight

from .common import float_bias


class TorchInt8Kernel(Kernel):
    name = "cpu.torch_int8"
    priority = 20
    device_types = ("cpu",)
    supported_bits = (8,)
    supported_group_sizes = (-1,)
    description = "PyTorch's CPU int8 weight-only kernel (_weight_int8pack_mm), per channel"

    @classmethod
    def probe(cls, device: torch.device) -> str | None:
        reason = super().probe(device)
        if reason is None and not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            reason = f"torch {torch.__version__} has no _weight_int8pack_mm"
        return reason

    @classmethod
    def can_implement(cls, spec: KernelSpec) -> str | None:
        if spec.scheme.bits == 8 and not spec.scheme.per_channel:
            return (f"supports per-channel 8-bit only (one scale per output channel), got group size "
                    f"{spec.scheme.group_size}")
        return super().can_implement(spec)

    def __init__(self, qweight: QuantizedWeight, device: torch.device, dtype: torch.dtype):
        super().__init__(qweight, device, dtype)
        self.q8 = (qweight.codes.to(torch.int16) - 128).to(torch.int8).contiguous()
        s = qweight.scales.float()[:, 0]
        self.scales = s.to(dtype).contiguous()
        z = qweight.zeros.float()[:, 0]
        self.correction = None if bool((z == 128).all()) else ((128.0 - z) * s).contiguous()
        self.bias = float_bias(qweight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.dtype).contiguous()
        y = torch.ops.aten._weight_int8pack_mm(x2, self.q8, self.scales)
        if self.correction is not None or self.bias is not None:
            y = y.float()
            if self.correction is not None:
                y += x2.float().sum(-1, keepdim=True) * self.correction
            if self.bias is not None:
                y += self.bias
            y = y.to(self.dtype)
        return y.reshape(*lead, self.out_features)
