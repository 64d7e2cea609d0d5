"""Shared prepare-time helpers of the CPU kernels."""

from __future__ import annotations

import torch

from lowbit.errors import UnsupportedSchemeError
from lowbit.qweight import QuantizedWeight


def group_of(qw: QuantizedWeight) -> int:
    """The group length along K (K itself for per channel)."""
    return qw.scheme.group_width(qw.in_features)


def sort_act_order(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Codes with columns sorted by group, and the column permutation (None when already in order).

    With act-order (GPTQ desc_act) column k belongs to group ``g_idx[k]``; sorting the columns
    by group once at load makes the groups contiguous again, and the kernel then permutes the
    activations the same way on every call (``x.index_select(-1, perm)``), which costs one
    gather of ``M x K`` elements: small next to reading the weight at decode batch sizes.
    """
    if qw.has_trivial_g_idx():
        return qw.codes.contiguous(), None
    g = qw.g_idx.long()
    perm = torch.argsort(g, stable=True)
    counts = torch.bincount(g, minlength=qw.num_groups)
    gs = group_of(qw)
    if not bool((counts == gs).all()):
        raise UnsupportedSchemeError(
            f"g_idx puts {counts.min().item()}..{counts.max().item()} columns in a group, expected {gs} in each; "
            "CPU kernels need every group to have group_size columns. Use the reference kernel "
            "(LOWBIT_DISABLED_KERNELS=cpu.avx2_int4,cpu.torch_int4) or re-quantize."
        )
    return qw.codes[:, perm].contiguous(), perm


def float_bias(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    return None if qw.bias is None else qw.bias.to(dtype).contiguous()
