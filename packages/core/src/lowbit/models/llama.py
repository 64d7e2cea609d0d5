"""Llama-family decoders (Llama, Mistral, Qwen2/3, SmolLM3): separate q/k/v and gate/up linears."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..algorithms.context import LinearGroup
from .base import Adapter, config_get

#: llama's modules by role (:meth:`Adapter.layer_roles`); Gemma, Mixtral and the Qwen MoE families
#: share its attention and norm names
ROLES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
         "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
         "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
#: the roles of a llama-style attention block and its norms (MoE families: their MLP is experts)
ATTENTION_ROLES = {r: ROLES[r] for r in ("q", "k", "v", "o", "attn_norm", "mlp_norm")}


def attention_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """``(N, K)`` of q/k/v/o_proj from the config (grouped-query attention and ``head_dim`` included)."""
    hidden, heads = config_get(config, "hidden_size"), config_get(config, "num_attention_heads")
    if not (hidden and heads):
        return {}
    kv = config_get(config, "num_key_value_heads", heads)
    head_dim = config_get(config, "head_dim") or hidden // heads
    q, kvd = heads * head_dim, kv * head_dim
    return {"self_attn.q_proj": (q, hidden), "self_attn.k_proj": (kvd, hidden),
            "self_attn.v_proj": (kvd, hidden), "self_attn.o_proj": (hidden, q)}


def attention_biases(config: Any, qkv_bias: bool = False) -> set[str]:
    """The attention linears with a bias: q/k/v/o when the config sets ``attention_bias``; q/k/v
    always where the family has them unconditionally (``qkv_bias``: Qwen2, Qwen2-MoE)."""
    out = {ROLES[r] for r in ("q", "k", "v")} if qkv_bias else set()
    if config_get(config, "attention_bias", False):
        out |= {ROLES[r] for r in ("q", "k", "v", "o")}
    return out


def mlp_shapes(hidden: int, inter: int, prefix: str = "mlp.", names=("gate_proj", "up_proj", "down_proj")
               ) -> dict[str, tuple[int, int]]:
    """``(N, K)`` of a gated MLP's three linears."""
    gate, up, down = names
    return {prefix + gate: (inter, hidden), prefix + up: (inter, hidden), prefix + down: (hidden, inter)}


def attention_groups(layer: nn.Module, norm: str = ROLES["attn_norm"], offset: float = 0.0) -> list[LinearGroup]:
    """norm → q/k/v (inspect self_attn); v → o where shapes allow (no grouped-query attention)."""
    attn = layer.self_attn
    groups = [LinearGroup(norm, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "self_attn",
                          norm_offset=offset)]
    # v's output channels feed o's input channels one-to-one only without grouped-query attention
    if attn.v_proj.out_features == attn.o_proj.in_features:
        groups.append(LinearGroup("self_attn.v_proj", ["self_attn.o_proj"], "self_attn.o_proj"))
    else:
        groups.append(LinearGroup(None, ["self_attn.o_proj"], "self_attn.o_proj"))
    return groups


def mlp_groups(norm: str = ROLES["mlp_norm"], offset: float = 0.0) -> list[LinearGroup]:
    """norm → gate/up (inspect mlp); up → down."""
    return [LinearGroup(norm, ["mlp.gate_proj", "mlp.up_proj"], "mlp", norm_offset=offset),
            LinearGroup("mlp.up_proj", ["mlp.down_proj"], "mlp.down_proj")]


class LlamaAdapter(Adapter):
    name = "llama-family"
    model_types = ("llama", "mistral", "qwen2", "qwen3", "smollm3")

    def groups(self, layer: nn.Module) -> list[LinearGroup]:
        return attention_groups(layer) + mlp_groups()

    def blocks(self, layer: nn.Module) -> dict[str, str]:
        return {"self_attn": "self_attn.o_proj", "mlp": "mlp.down_proj"}

    def linear_shapes(self, config: Any) -> dict[str, tuple[int, int]]:
        att, inter = attention_shapes(config), config_get(config, "intermediate_size")
        if not (att and inter):
            return {}
        return {**att, **mlp_shapes(config_get(config, "hidden_size"), inter)}

    def layer_roles(self, config: Any) -> dict[str, str]:
        if config_get(config, "model_type") == "qwen3":  # per-head RMSNorms of queries and keys
            return {**ROLES, "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"}
        return dict(ROLES)

    def biased_linears(self, config: Any) -> set[str]:
        out = attention_biases(config, qkv_bias=config_get(config, "model_type") == "qwen2")
        if config_get(config, "mlp_bias", False):
            out |= {ROLES[r] for r in ("gate", "up", "down")}
        return out


LLAMA_FAMILY = LlamaAdapter()
