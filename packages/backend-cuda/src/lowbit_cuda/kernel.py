"""The Triton W4A16 kernel as lowbit sees it: declared support, probe, one-time repack, dispatch.

``__init__`` repacks the QuantizedWeight once into the layout named by ``layout`` (``triton-kpack``,
lowbit_cuda.packing), through the packer registered under that name, and moves it to the GPU; ``forward`` flattens ``x`` to ``[M, K]`` and sends batches up to ``configs.GEMV_MAX_BATCH``
rows to the split-K GEMV (decode) and larger ones to the tiled GEMM (prefill).
"""

from __future__ import annotations

import torch

from lowbit import Kernel, KernelSpec, QuantizedWeight, registry

from . import configs
from .packing import TritonPacker, check_scheme, packed_weight
from .probe import probe_cuda


class TritonW4A16Kernel(Kernel):
    name = "cuda.triton_w4a16"
    priority = 50
    device_types = ("cuda",)
    supported_bits = (2, 4, 8)
    supported_group_sizes = (32, 64, 128, -1)
    supported_dtypes = (torch.float16, torch.bfloat16)
    supports_act_order = True
    supports_sym = True
    supports_asym = True
    layout = TritonPacker.name
    description = "Triton: split-K GEMV for batch <= 16, tiled GEMM above; int4 (and int2/int8) dequantized in registers"

    @classmethod
    def probe(cls, device: torch.device) -> str | None:
        return probe_cuda(torch.device(device))

    @classmethod
    def can_implement(cls, spec: KernelSpec) -> str | None:
        return super().can_implement(spec) or check_scheme(spec.scheme)

    def __init__(self, qweight: QuantizedWeight, device: torch.device, dtype: torch.dtype):
        super().__init__(qweight, device, dtype)
        tensors = self.packer(registry("packers"))().pack(qweight)
        self.packed = packed_weight(tensors, qweight.scheme, qweight.in_features, qweight.out_features, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .kernels.w4a16_gemm import w4a16_gemm
        from .kernels.w4a16_gemv import w4a16_gemv

        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        fn = w4a16_gemv if x2.shape[0] <= configs.GEMV_MAX_BATCH else w4a16_gemm
        return fn(x2, self.packed).reshape(*lead, self.out_features)
