"""Architecture adapters: where a model's decoder layers are and which linears share an input."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..algorithms.base import LinearGroup
from ..errors import ModelLoadError
from ..plugins import registry


@dataclass(frozen=True)
class Adapter:
    """:param name: adapter name.
    :param model_types: HF ``config.model_type`` values it serves.
    :param layers_path: path of the ModuleList of decoder layers.
    """

    name: str
    model_types: tuple[str, ...]
    layers_path: str = "model.layers"

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers_path}.{index}."

    def groups(self, layer: nn.Module) -> list[LinearGroup]:
        """Llama-family decoder: norm → q/k/v; v → o (when shapes allow); norm → gate/up; up → down."""
        attn, mlp = layer.self_attn, layer.mlp
        groups = [
            LinearGroup("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "self_attn"),
        ]
        # v's output channels feed o's input channels one-to-one only without grouped-query attention
        if attn.v_proj.out_features == attn.o_proj.in_features:
            groups.append(LinearGroup("self_attn.v_proj", ["self_attn.o_proj"], "self_attn.o_proj"))
        else:
            groups.append(LinearGroup(None, ["self_attn.o_proj"], "self_attn.o_proj"))
        groups.append(LinearGroup("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"], "mlp"))
        groups.append(LinearGroup("mlp.up_proj", ["mlp.down_proj"], "mlp.down_proj"))
        assert isinstance(mlp, nn.Module)
        return groups

    def blocks(self, layer: nn.Module) -> dict[str, str]:
        """Blocks whose output is one linear's output: attention ends in o_proj, the MLP in down_proj."""
        return {"self_attn": "self_attn.o_proj", "mlp": "mlp.down_proj"}


LLAMA_FAMILY = Adapter("llama-family", ("llama", "mistral", "qwen2", "qwen3", "smollm3"))


def adapter_for(config) -> Adapter:
    """The adapter for an HF config, or a clear error naming the supported architectures."""
    model_type = getattr(config, "model_type", None)
    reg = registry("architectures")
    if model_type not in reg:
        raise ModelLoadError(
            f"architecture {model_type!r} is not supported; supported: {', '.join(reg.names())}. "
            "A plugin can add it through lowbit_register_architectures."
        )
    return reg.get(model_type)
