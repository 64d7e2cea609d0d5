"""Mixtral: every expert's w1 (gate), w3 (up) and w2 (down) quantized; the router stays float.

AutoAWQ and GPTQModel write ``model.layers.L.block_sparse_moe.experts.E.w1`` and the router as
``block_sparse_moe.gate``; transformers 5 calls the block ``mlp``. AWQ groups: the post-attention
norm feeds every expert's w1/w3 (one scale, statistics from the whole block's input, the router's
input columns scaled alike); per expert, w3 → w2. GPTQ takes one Hessian per expert (each sees
only its routed tokens).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..algorithms.context import LinearGroup
from ._experts import split_experts
from .base import Adapter, config_get
from .llama import ATTENTION_ROLES, attention_groups, attention_shapes, mlp_shapes

NAMES = ("w1", "w3", "w2")  # gate, up, down


def expert_groups(n_experts: int, names: tuple[str, str, str], also_scaled: tuple[str, ...],
                  shared: str | None = None) -> list[LinearGroup]:
    """The MoE block's AWQ groups: norm → every expert's gate/up (and a shared expert's), then per
    expert up → down; ``also_scaled``: the float linears (router) reading the norm's output."""
    gate, up, down = names
    parents = [f"mlp.experts.{e}" for e in range(n_experts)]
    shared_names = ("gate_proj", "up_proj", "down_proj")
    ins = [f"{p}.{n}" for p in parents for n in (gate, up)]
    if shared:
        ins += [f"{shared}.{shared_names[0]}", f"{shared}.{shared_names[1]}"]
    groups = [LinearGroup("post_attention_layernorm", ins, "mlp", source="mlp", also_scaled=also_scaled,
                          inputs_per_parent=True)]
    groups += [LinearGroup(f"{p}.{up}", [f"{p}.{down}"], f"{p}.{down}", stage="experts.down") for p in parents]
    if shared:
        groups.append(LinearGroup(f"{shared}.up_proj", [f"{shared}.down_proj"], f"{shared}.down_proj",
                                  stage="experts.down"))
    return groups


class MixtralAdapter(Adapter):
    name = "mixtral"
    model_types = ("mixtral",)
    checkpoint_renames = (("mlp.", "block_sparse_moe."),)

    def prepare(self, model: nn.Module) -> None:
        for layer in model.get_submodule(self.layers_path):
            split_experts(layer.mlp, NAMES)

    def groups(self, layer: nn.Module) -> list[LinearGroup]:
        return attention_groups(layer) + expert_groups(len(layer.mlp.experts), NAMES, ("mlp.gate",))

    def blocks(self, layer: nn.Module) -> dict[str, str]:
        return {"self_attn": "self_attn.o_proj"}

    def linear_shapes(self, config: Any) -> dict[str, tuple[int, int]]:
        att, inter = attention_shapes(config), config_get(config, "intermediate_size")
        n = config_get(config, "num_local_experts")
        if not (att and inter and n):
            return {}
        hidden = config_get(config, "hidden_size")
        out = dict(att)
        for e in range(n):
            out.update(mlp_shapes(hidden, inter, f"mlp.experts.{e}.", NAMES))
        return out

    def layer_roles(self, config: Any) -> dict[str, str]:
        return dict(ATTENTION_ROLES)
