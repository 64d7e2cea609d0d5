"""Phi-3 (and Phi-3.5, Phi-4 mini): q/k/v fused in ``qkv_proj``, gate/up fused in ``gate_up_proj``.

AutoAWQ and GPTQModel quantize the fused linears as they are, under these names. AWQ folds the
down_proj group's scales into the up half (the last rows) of ``gate_up_proj``, which feeds
``down_proj`` through ``act(gate) * up``; o_proj has no op to fold into (qkv's output is not
o_proj's input channel for channel).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..algorithms.context import LinearGroup
from .base import Adapter, config_get
from .llama import attention_shapes


class Phi3Adapter(Adapter):
    name = "phi3"
    model_types = ("phi3",)

    def groups(self, layer: nn.Module) -> list[LinearGroup]:
        return [LinearGroup("input_layernorm", ["self_attn.qkv_proj"], "self_attn"),
                LinearGroup(None, ["self_attn.o_proj"], "self_attn.o_proj"),
                LinearGroup("post_attention_layernorm", ["mlp.gate_up_proj"], "mlp"),
                LinearGroup("mlp.gate_up_proj", ["mlp.down_proj"], "mlp.down_proj")]

    def blocks(self, layer: nn.Module) -> dict[str, str]:
        return {"self_attn": "self_attn.o_proj", "mlp": "mlp.down_proj"}

    def linear_shapes(self, config: Any) -> dict[str, tuple[int, int]]:
        att, inter = attention_shapes(config), config_get(config, "intermediate_size")
        if not (att and inter):
            return {}
        hidden = config_get(config, "hidden_size")
        q, kv = att["self_attn.q_proj"][0], att["self_attn.k_proj"][0]
        return {"self_attn.qkv_proj": (q + 2 * kv, hidden), "self_attn.o_proj": (hidden, q),
                "mlp.gate_up_proj": (2 * inter, hidden), "mlp.down_proj": (hidden, inter)}

    def layer_roles(self, config: Any) -> dict[str, str]:
        return {"qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj", "gate_up": "mlp.gate_up_proj",
                "down": "mlp.down_proj", "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
