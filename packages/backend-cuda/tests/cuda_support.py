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

from lowbit import QuantizedWeight, QuantScheme
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


def random_qweight(
    n: int, k: int, scheme: QuantScheme, seed: int = 0, bias: bool = False, g_idx: torch.Tensor | None = None
) -> QuantizedWeight:
    """Random codes, scales and zeros (zeros 2**(bits-1) when sym); ``g_idx`` as given, or a
    random act-order permutation when ``scheme.act_order``."""
    gen = torch.Generator().manual_seed(seed)
    ng = scheme.num_groups(k)
    codes = torch.randint(0, scheme.maxq + 1, (n, k), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(n, ng, generator=gen) * 0.02 + 0.001).to(torch.float16)
    if scheme.sym:
        zeros = torch.full((n, ng), 1 << (scheme.bits - 1), dtype=torch.uint8)
    else:
        zeros = torch.randint(0, scheme.maxq + 1, (n, ng), generator=gen, dtype=torch.uint8)
    if g_idx is None and scheme.act_order:
        gs = k if scheme.group_size == -1 else scheme.group_size
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[torch.randperm(k, generator=gen)] = (torch.arange(k) // gs).to(torch.int32)
    b = torch.randn(n, generator=gen) if bias else None
    return QuantizedWeight(codes, scales, zeros, scheme, g_idx=g_idx, bias=b)


def reference(x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """The oracle: fp32 dequantize + fp32 matmul (+ bias)."""
    y = x.float().cpu() @ qw.dequantize(torch.float32).t()
    return y if qw.bias is None else y + qw.bias.float()


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float().cpu() - ref).norm() / ref.norm())
