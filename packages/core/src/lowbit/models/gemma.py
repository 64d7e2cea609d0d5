"""Gemma 1/2/3: llama-like linears, RMSNorms that compute ``x̂ · (1 + w)``; Gemma 3 with its vision
tower (``model_type: gemma3``) quantizes the language model's decoder layers only.

The norm offset matters to AWQ: folding a scale ``s`` into a Gemma norm gives
``w' = (1 + w) / s - 1``, not ``w / s``. Gemma 2 and 3 normalise the attention and MLP outputs too
(post norms) and feed the MLP from ``pre_feedforward_layernorm``; attention and final-logit
soft-capping are part of the float forward and need nothing here.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..algorithms.context import LinearGroup
from .base import Adapter, config_get
from .llama import ROLES, attention_biases, attention_groups, attention_shapes, mlp_groups, mlp_shapes

NORM_OFFSET = 1.0


class GemmaAdapter(Adapter):
    name = "gemma"
    model_types = ("gemma", "gemma2", "gemma3_text")

    def groups(self, layer: nn.Module) -> list[LinearGroup]:
        mlp_norm = "pre_feedforward_layernorm" if hasattr(layer, "pre_feedforward_layernorm") else \
            "post_attention_layernorm"
        return attention_groups(layer, offset=NORM_OFFSET) + mlp_groups(mlp_norm, offset=NORM_OFFSET)

    def blocks(self, layer: nn.Module) -> dict[str, str]:
        return {"self_attn": "self_attn.o_proj", "mlp": "mlp.down_proj"}

    def linear_shapes(self, config: Any) -> dict[str, tuple[int, int]]:
        att, inter = attention_shapes(config), config_get(config, "intermediate_size")
        if not (att and inter):
            return {}
        return {**att, **mlp_shapes(config_get(config, "hidden_size"), inter)}

    def layer_roles(self, config: Any) -> dict[str, str]:
        # Gemma 2 and 3 feed the MLP from pre_feedforward_layernorm; their post_attention_layernorm
        # normalises the attention's output
        if config_get(config, "model_type") == "gemma":
            return dict(ROLES)
        return {**ROLES, "mlp_norm": "pre_feedforward_layernorm"}

    def biased_linears(self, config: Any) -> set[str]:
        return attention_biases(config)


class Gemma3VisionAdapter(GemmaAdapter):
    """Gemma 3 image-text (``Gemma3ForConditionalGeneration``): the decoder layers under
    ``model.language_model``; the vision tower and the projector stay float, and AutoAWQ-style
    checkpoints list them in ``modules_to_not_convert``."""

    name = "gemma3-vision"
    model_types = ("gemma3",)
    layers_path = "model.language_model.layers"
    embedding = "model.language_model.embed_tokens"
    final_norm = "model.language_model.norm"
    float_modules = ("model.vision_tower", "model.multi_modal_projector")

    def linear_shapes(self, config: Any) -> dict[str, tuple[int, int]]:
        return super().linear_shapes(config_get(config, "text_config"))

    def biased_linears(self, config: Any) -> set[str]:
        return super().biased_linears(config_get(config, "text_config"))
