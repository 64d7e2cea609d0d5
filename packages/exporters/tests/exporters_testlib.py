"""Helpers of the exporters tests: random QuantizedWeights with edge values, tiny quantized llamas.

(A uniquely named module, not conftest, so that importing it never picks another package's conftest.)
"""

from __future__ import annotations

import torch

from lowbit import QuantizedModel, QuantizedWeight, QuantScheme
from lowbit.primitives import quantize, quantize_codes
from lowbit.testing import act_order_g_idx

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def tiny_config(arch: str = "llama", **overrides):
    from transformers import LlamaConfig, Qwen2Config

    cfg = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=384, max_position_embeddings=256, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2, rope_theta=50000.0)
    cfg.update(overrides)
    return {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch](**cfg)


def tiny_qmodel(scheme: QuantScheme, seed: int = 0, arch: str = "llama", **overrides) -> QuantizedModel:
    """A seeded random LlamaForCausalLM quantized linear by linear with lowbit.primitives.quantize
    (act-order: codes recomputed against a permuted g_idx)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch, **overrides)
    model = AutoModelForCausalLM.from_config(config).eval()
    gen = torch.Generator().manual_seed(seed)
    qweights = {}
    for i in range(config.num_hidden_layers):
        for leaf in LINEARS:
            path = f"model.layers.{i}.{leaf}"
            lin = model.get_submodule(path)
            w = lin.weight.detach()
            bias = None if lin.bias is None else lin.bias.detach().clone()
            qw = quantize(w, scheme, bias=bias)
            if scheme.act_order:
                g_idx = act_order_g_idx(w.shape[1], scheme, gen)
                qw = QuantizedWeight(codes=quantize_codes(w, qw.scales, qw.zeros, scheme, g_idx), scales=qw.scales,
                                     zeros=qw.zeros, scheme=scheme, g_idx=g_idx, bias=bias)
            qweights[path] = qw
    floats = {k: v.detach().clone() for k, v in model.state_dict().items()
              if k.rpartition(".")[0] not in qweights}
    if config.tie_word_embeddings:
        floats.pop("lm_head.weight", None)
    return QuantizedModel(config, scheme, qweights, floats)
