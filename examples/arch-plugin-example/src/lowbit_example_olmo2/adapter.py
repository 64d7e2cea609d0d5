"""OLMo-2 (``model_type: olmo2``): llama's linears, but post-norms instead of pre-norms.

A decoder layer computes ``h + post_attention_layernorm(self_attn(h))`` and then
``h + post_feedforward_layernorm(mlp(h))``: q/k/v and gate/up read the residual stream ``h``
itself, which no single op produces, so their groups have ``prev=None``. q_norm/k_norm normalise
the q/k projections and stay float. AutoAWQ and GPTQModel name the linears as transformers does.
"""

from __future__ import annotations

from lowbit.algorithms.base import LinearGroup
from lowbit.models import Adapter, config_get

#: OLMo-2's modules by generic role: what AWQ (no clipping of q and k) and formats ask for. Its
#: norms follow the attention and the MLP, so no norm feeds either: no attn_norm / mlp_norm role.
ROLES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
         "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


class Olmo2Adapter(Adapter):
    name = "example-olmo2"
    model_types = ("olmo2",)

    def groups(self, layer):
        attn = layer.self_attn
        groups = [LinearGroup(None, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "self_attn")]
        if attn.v_proj.out_features == attn.o_proj.in_features:  # v feeds o channel for channel without GQA
            groups.append(LinearGroup("self_attn.v_proj", ["self_attn.o_proj"], "self_attn.o_proj"))
        else:
            groups.append(LinearGroup(None, ["self_attn.o_proj"], "self_attn.o_proj"))
        return groups + [LinearGroup(None, ["mlp.gate_proj", "mlp.up_proj"], "mlp"),
                         LinearGroup("mlp.up_proj", ["mlp.down_proj"], "mlp.down_proj")]

    def layer_roles(self, config):
        return dict(ROLES)

    def blocks(self, layer):
        return {"self_attn": "self_attn.o_proj", "mlp": "mlp.down_proj"}

    def linear_shapes(self, config):
        hidden, heads = config_get(config, "hidden_size"), config_get(config, "num_attention_heads")
        inter = config_get(config, "intermediate_size")
        if not (hidden and heads and inter):
            return {}
        head_dim = config_get(config, "head_dim") or hidden // heads
        q, kv = heads * head_dim, config_get(config, "num_key_value_heads", heads) * head_dim
        return {"self_attn.q_proj": (q, hidden), "self_attn.k_proj": (kv, hidden), "self_attn.v_proj": (kv, hidden),
                "self_attn.o_proj": (hidden, q), "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
                "mlp.down_proj": (hidden, inter)}
