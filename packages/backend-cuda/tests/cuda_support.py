"""Shared by the backend-cuda tests: where the Triton kernels run, random weights, the oracle.

- A CUDA device (probe passes) and no TRITON_INTERPRET: compiled, on "cuda", fp16 and bf16.
- TRITON_INTERPRET=1 (the `cuda` tox env; CI on CPU-only machines): interpreted by numpy on
  CPU tensors, fp16 only (the interpreter has no bf16), small shapes.
- Neither: the kernel tests skip with the probe's reason.
"""

from __future__ import annotations

import os

import pytest
import torch

from lowbit import QuantizedWeight
from lowbit_cuda.kernel import TritonW4A16Kernel

INTERPRET = os.environ.get("TRITON_INTERPRET", "") not in ("", "0")
PROBE = TritonW4A16Kernel.probe(torch.device("cuda"))
ON_GPU = PROBE is None and not INTERPRET
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPES = (torch.float16, torch.bfloat16) if ON_GPU else (torch.float16,)
# relative Frobenius error ||y - ref|| / ||ref|| against fp32 dequantize + matmul: fp16 keeps the
# dequantized weight and the output to 11 bits (measured ~3e-4), bf16 to 8 bits
RTOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}

needs_triton_runner = pytest.mark.skipif(
    not (ON_GPU or INTERPRET), reason=f"{PROBE}; set TRITON_INTERPRET=1 to run the Triton kernels on the CPU"
)


def reference(x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """The oracle: fp32 dequantize + fp32 matmul (+ bias)."""
    y = x.float().cpu() @ qw.dequantize(torch.float32).t()
    return y if qw.bias is None else y + qw.bias.float()


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float().cpu() - ref).norm() / ref.norm())
