"""Mixture-of-experts blocks as lowbit quantizes them: one ``nn.Linear`` per expert linear.

transformers 5 keeps a MoE block's experts as two fused parameters, ``gate_up_proj`` ``[E, 2I, H]``
(gate rows first) and ``down_proj`` ``[E, H, I]``; checkpoints, AutoAWQ and GPTQModel name one
linear per expert. :func:`split_experts` replaces the fused module by :class:`Experts`, which holds
those linears and computes the same routed sum (same expert order, so the same float additions).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ModelLoadError


class Expert(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))`` with its linears under the family's names."""

    def __init__(self, names: tuple[str, str, str], hidden: int, inter: int, act: nn.Module):
        super().__init__()
        self.names = names
        gate, up, down = names
        self.add_module(gate, nn.Linear(hidden, inter, bias=False))
        self.add_module(up, nn.Linear(hidden, inter, bias=False))
        self.add_module(down, nn.Linear(inter, hidden, bias=False))
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act(gate(x)) * up(x))


class Experts(nn.ModuleList):
    """The experts of one MoE block, called like transformers' fused experts module."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token_idx, pos = torch.where(top_k_index == e)
            if token_idx.numel() == 0:
                continue
            y = expert(hidden_states[token_idx]) * top_k_weights[token_idx, pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


@torch.no_grad()
def split_experts(block: nn.Module, names: tuple[str, str, str]) -> None:
    """Replace ``block.experts`` (fused) by :class:`Experts`; a no-op when already split. On a skeleton (fused
    tensors on the meta device) the expert linears are made there too, named as checkpoints store them, so the
    streaming pass reads each expert's weights from the files as its layer comes up."""
    fused = block.experts
    if isinstance(fused, Experts):
        return
    gate_up, down = getattr(fused, "gate_up_proj", None), getattr(fused, "down_proj", None)
    if not isinstance(gate_up, torch.Tensor) or gate_up.dim() != 3 or getattr(fused, "has_bias", False):
        raise ModelLoadError(f"{type(fused).__name__} does not hold fused [E, 2I, H] gate_up_proj tensors without "
                             "bias; this transformers version lays MoE experts out in a way lowbit does not know.")
    n, two_i, hidden = gate_up.shape
    inter = two_i // 2
    if tuple(down.shape) != (n, hidden, inter):
        raise ModelLoadError(f"{type(fused).__name__}.down_proj is {list(down.shape)}, expected {[n, hidden, inter]}.")
    experts = []
    with torch.device(gate_up.device):  # a skeleton's experts stay on the meta device: nothing allocated
        for e in range(n):
            ex = Expert(names, hidden, inter, fused.act_fn).to(dtype=gate_up.dtype)
            if gate_up.device.type != "meta":
                getattr(ex, names[0]).weight.copy_(gate_up[e, :inter])
                getattr(ex, names[1]).weight.copy_(gate_up[e, inter:])
                getattr(ex, names[2]).weight.copy_(down[e])
            experts.append(ex)
    block.experts = Experts(experts)
