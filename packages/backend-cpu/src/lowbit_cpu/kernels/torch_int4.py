"""cpu.torch_int4: PyTorch's own CPU int4 kernel (``aten._weight_int4pack_mm_for_cpu``).

PyTorch dequantizes ``w = (q - 8) * scale + zero`` with a float zero per group; lowbit's
``w = (q - z) * s`` maps to it exactly with ``scale = s`` and ``zero = (8 - z) * s``. Scales and
zeros are stored in the activation dtype (the op requires it), so bf16 activations see scales
rounded to bf16 (relative 2^-9). Group sizes 32..256; per channel only where K itself is one
of those. Needs no compiler: the fallback where cpu.avx2_int4 cannot build.
"""

from __future__ import annotations

import torch

from lowbit.kernels.base import Kernel, KernelSpec
from lowbit.qweight import QuantizedWeight

from .common import float_bias, group_of, sort_act_order

TORCH_GROUP_SIZES = (32, 64, 128, 256)


class TorchInt4Kernel(Kernel):
    name = "cpu.torch_int4"
    priority = 20
    device_types = ("cpu",)
    supported_bits = (4,)
    supported_group_sizes = (32, 64, 128, -1)
    description = "PyTorch's CPU int4 kernel (_weight_int4pack_mm_for_cpu), every batch size"

    @classmethod
    def probe(cls, device: torch.device) -> str | None:
        reason = super().probe(device)
        if reason is None and not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            reason = f"torch {torch.__version__} has no _weight_int4pack_mm_for_cpu (needs torch >= 2.6)"
        return reason

    @classmethod
    def can_implement(cls, spec: KernelSpec) -> str | None:
        reason = super().can_implement(spec)
        if reason is not None:
            return reason
        if spec.scheme.per_channel and spec.in_features not in TORCH_GROUP_SIZES:
            return (f"per channel needs in_features in {TORCH_GROUP_SIZES} (torch's group sizes), "
                    f"got {spec.in_features}")
        if spec.out_features % 16:
            return f"needs out_features to be a multiple of 16, got {spec.out_features}"
        return None

    def __init__(self, qweight: QuantizedWeight, device: torch.device, dtype: torch.dtype):
        super().__init__(qweight, device, dtype)
        codes, self.perm = sort_act_order(qweight)
        self.group = group_of(qweight)
        self.packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        s = qweight.scales.float()
        zero = (8.0 - qweight.zeros.float()) * s
        self.scale_zero = torch.stack([s.t(), zero.t()], dim=-1).to(dtype).contiguous()  # [NG, N, 2]
        self.bias = float_bias(qweight, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(self.dtype).contiguous(), self.packed, self.group,
                                                       self.scale_zero)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)
