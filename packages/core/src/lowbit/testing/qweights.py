"""The one builder of random QuantizedWeights for tests (packers, exporters, kernels)."""

from __future__ import annotations

import torch

from ..qweight import QuantizedWeight
from ..scheme import QuantScheme


def act_order_g_idx(k: int, scheme: QuantScheme, gen: torch.Generator) -> torch.Tensor:
    """A random act-order ``g_idx``: every group's columns scattered over K (``int32 [K]``)."""
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[torch.randperm(k, generator=gen)] = (torch.arange(k) // scheme.group_width(k)).to(torch.int32)
    return g_idx


def random_qweight(n: int, k: int, scheme: QuantScheme, seed: int = 0, bias: bool = False,
                   g_idx: torch.Tensor | None = None, edges: bool = False, scale_max: float = 0.1,
                   bias_dtype: torch.dtype = torch.float32) -> QuantizedWeight:
    """Seeded random codes, fp16 scales in ``[1e-3, 1e-3 + scale_max)`` and zeros (``2**(bits-1)``
    when sym); ``g_idx`` as given, or a random permutation under ``scheme.act_order``. ``edges``
    puts the values formats must hold in: codes 0 and ``2**b - 1``, and (asym) zeros 0 and
    ``2**b - 1``."""
    gen = torch.Generator().manual_seed(seed)
    ng = scheme.num_groups(k)
    codes = torch.randint(0, scheme.maxq + 1, (n, k), generator=gen, dtype=torch.int64).to(torch.uint8)
    if scheme.sym:
        zeros = torch.full((n, ng), 1 << (scheme.bits - 1), dtype=torch.uint8)
    else:
        zeros = torch.randint(0, scheme.maxq + 1, (n, ng), generator=gen, dtype=torch.int64).to(torch.uint8)
    if edges:
        codes[0, 0], codes[-1, -1] = 0, scheme.maxq
        if not scheme.sym:
            zeros[0, 0], zeros[-1, -1] = 0, scheme.maxq
    scales = (torch.rand(n, ng, generator=gen) * scale_max + 1e-3).half()
    if g_idx is None and scheme.act_order:
        g_idx = act_order_g_idx(k, scheme, gen)
    b = torch.randn(n, generator=gen).to(bias_dtype) if bias else None
    return QuantizedWeight(codes=codes, scales=scales, zeros=zeros, scheme=scheme, g_idx=g_idx, bias=b)
