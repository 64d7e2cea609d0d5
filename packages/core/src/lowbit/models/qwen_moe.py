"""Qwen2-MoE and Qwen3-MoE: every expert's gate/up/down_proj (and Qwen2-MoE's shared expert)
quantized; the router ``mlp.gate`` and Qwen2-MoE's ``shared_expert_gate`` stay float.

Checkpoints, AutoAWQ and GPTQModel name the experts ``mlp.experts.E.gate_proj`` etc., as lowbit's
split module tree does. Layers listed in ``mlp_only_layers`` (or off ``decoder_sparse_step``) have a
dense llama MLP instead. AWQ and GPTQ groups as for Mixtral (see mixtral.py).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..algorithms.context import LinearGroup
from ._experts import split_experts
from .base import Adapter, config_get
from .llama import ATTENTION_ROLES, attention_biases, attention_groups, attention_shapes, mlp_groups, mlp_shapes
from .mixtral import expert_groups

NAMES = ("gate_proj", "up_proj", "down_proj")


def _sparse(config: Any, index: int) -> bool:
    return (index not in (config_get(config, "mlp_only_layers") or []) and config_get(config, "num_experts", 0) > 0
            and (index + 1) % config_get(config, "decoder_sparse_step", 1) == 0)


class QwenMoeAdapter(Adapter):
    name = "qwen-moe"
    model_types = ("qwen2_moe", "qwen3_moe")

    def prepare(self, model: nn.Module) -> None:
        for layer in model.get_submodule(self.layers_path):
            if hasattr(layer.mlp, "experts"):
                split_experts(layer.mlp, NAMES)

    def groups(self, layer: nn.Module) -> list[LinearGroup]:
        mlp = layer.mlp
        if not hasattr(mlp, "experts"):
            return attention_groups(layer) + mlp_groups()
        shared = "mlp.shared_expert" if hasattr(mlp, "shared_expert") else None
        also = ("mlp.gate", "mlp.shared_expert_gate") if hasattr(mlp, "shared_expert_gate") else ("mlp.gate",)
        return attention_groups(layer) + expert_groups(len(mlp.experts), NAMES, also, shared)

    def blocks(self, layer: nn.Module) -> dict[str, str]:
        if hasattr(layer.mlp, "experts"):
            return {"self_attn": "self_attn.o_proj"}
        return {"self_attn": "self_attn.o_proj", "mlp": "mlp.down_proj"}

    def linear_shapes(self, config: Any) -> dict[str, tuple[int, int]]:
        att, moe_inter = attention_shapes(config), config_get(config, "moe_intermediate_size")
        n, layers = config_get(config, "num_experts"), config_get(config, "num_hidden_layers")
        if not (att and moe_inter and n and layers):
            return {}
        hidden = config_get(config, "hidden_size")
        out = dict(att)
        for e in range(n):
            out.update(mlp_shapes(hidden, moe_inter, f"mlp.experts.{e}."))
        shared = config_get(config, "shared_expert_intermediate_size")
        if shared:
            out.update(mlp_shapes(hidden, shared, "mlp.shared_expert."))
        if not all(_sparse(config, i) for i in range(layers)):
            out.update(mlp_shapes(hidden, config_get(config, "intermediate_size"), "mlp."))
        return out

    def layer_roles(self, config: Any) -> dict[str, str]:
        return dict(ATTENTION_ROLES)  # the MLP is experts (or, in some layers, dense): no MLP roles

    def biased_linears(self, config: Any) -> set[str]:
        return attention_biases(config, qkv_bias=config_get(config, "model_type") == "qwen2_moe")
