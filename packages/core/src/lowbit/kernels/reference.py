"""The reference kernel: dequantize once, then a plain matmul. Runs every scheme on every
device and is the numerical oracle of the kernel conformance suite."""

from __future__ import annotations

import torch

from ..qweight import QuantizedWeight
from .base import Kernel


class ReferenceKernel(Kernel):
    name = "reference"
    priority = 0
    device_types = ("cpu", "cuda", "xpu", "mps")
    description = "dequantize to the activation dtype at load, then torch matmul"
    supports_partial_groups = True

    def __init__(self, qweight: QuantizedWeight, device: torch.device, dtype: torch.dtype):
        super().__init__(qweight, device, dtype)
        self.weight = qweight.dequantize(dtype).to(device)
        self.bias = None if qweight.bias is None else qweight.bias.to(device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)
