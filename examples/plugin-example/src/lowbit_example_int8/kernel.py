"""W8 per-channel linear on ``torch._weight_int8pack_mm`` (bf16 activations, CPU).

PyTorch's int8 weight-only kernel computes ``y = (x @ Wq.T) * s`` for a signed int8 ``Wq [N, K]``
and per-row scales ``s [N]``. lowbit's codes are unsigned with a zero point per row, so::

    W[n, k] = (c[n, k] - z[n]) * s[n]
            = (c[n, k] - 128) * s[n] + (128 - z[n]) * s[n]
              └── int8 Wq ──┘          └─ corr[n] ─┘

    y[m, n] = int8pack_mm(x, Wq, s)[m, n] + (Σ_k x[m, k]) * corr[n]

A symmetric weight has ``z = 128`` everywhere and skips the correction. With per-channel groups
g_idx is all zeros, so act-order weights need nothing extra. Only bf16 activations take the
kernel: PyTorch's fp16/fp32 paths for it are several times slower than a dense matmul here,
so the kernel declines them and selection falls back to another kernel.
"""

from __future__ import annotations

import torch

from lowbit import Kernel, QuantizedWeight


class Int8PerChannelKernel(Kernel):
    name = "example.int8_pc"
    priority = 80  # above the reference kernel (0): chosen wherever it can run
    device_types = ("cpu",)
    supported_bits = (8,)
    supported_group_sizes = (-1,)
    supported_dtypes = (torch.bfloat16,)
    supports_act_order = True  # per channel: g_idx is all zeros, nothing to permute
    description = "w8 per-channel, bf16: torch._weight_int8pack_mm + zero-point correction"

    @classmethod
    def probe(cls, device: torch.device) -> str | None:
        reason = super().probe(device)
        if reason:
            return reason
        if not hasattr(torch, "_weight_int8pack_mm"):
            return f"torch {torch.__version__} has no _weight_int8pack_mm (needs torch>=2.4)"
        return None

    def __init__(self, qweight: QuantizedWeight, device: torch.device, dtype: torch.dtype):
        super().__init__(qweight, device, dtype)
        # prepare once: unsigned codes → signed int8, fp16 scales → activation dtype, correction per row
        self.weight = (qweight.codes.to(torch.int16) - 128).to(torch.int8).contiguous().to(device)
        scales = qweight.scales[:, 0].float()
        self.scales = scales.to(device=device, dtype=dtype).contiguous()
        shift = 128 - qweight.zeros[:, 0].float()
        self.corr = None if bool((shift == 0).all()) else (shift * scales).to(device)
        self.bias = None if qweight.bias is None else qweight.bias.to(device=device, dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        y = torch._weight_int8pack_mm(x2, self.weight, self.scales)
        if self.corr is not None or self.bias is not None:
            y = y.float()
            if self.corr is not None:
                y = y + x2.float().sum(-1, keepdim=True) * self.corr
            if self.bias is not None:
                y = y + self.bias
            y = y.to(self.dtype)
        return y.reshape(*shape[:-1], y.shape[-1])
