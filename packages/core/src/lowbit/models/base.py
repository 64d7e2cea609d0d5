"""The architecture adapter: the one place that knows a model family's facts.

An adapter says where a model's decoder layers are, which linears share an input and which op
feeds them (AWQ's groups), each linear's ``(out, in)`` shape from the HF config alone (checked
before loading), the names the safetensors formats (AutoAWQ, GPTQ) give its tensors, and what each
module is in generic terms (its role: q, k, v, o, gate, up, down, the norms, the embedding, the
final norm, the lm_head). The pipeline, the algorithms, the exporters and their readers ask the
adapter; nothing else names a family's modules, and a format maps roles to its own names (xFT's
exporter owns its layout). Adding a family is one subclass in one file, registered through
``lowbit_register_architectures`` (docs/plugins.md).

Nothing here looks adapters up: :func:`adapter_for` and :func:`adapter_or_none` are given the
registry to search, so this module (which lowbit's own plugin imports) never reaches back to the
plugin manager.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from torch import nn

from ..algorithms.context import LinearGroup
from ..errors import ModelLoadError
from ..registry import Registry

#: the roles a decoder layer's modules can have (:meth:`Adapter.layer_roles`): the attention's query,
#: key, value and output projections, a gated MLP's gate, up and down projections, a fused q/k/v or
#: gate/up projection, the norm feeding the attention and the one feeding the MLP, and per-head query and
#: key norms (Qwen3)
LAYER_ROLES = ("q", "k", "v", "o", "qkv", "gate", "up", "down", "gate_up", "attn_norm", "mlp_norm", "q_norm", "k_norm")


def config_get(config: Any, key: str, default: Any = None) -> Any:
    """``config[key]`` for a dict or an HF config object (None → ``default``)."""
    if config is None:
        return default
    v = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
    return default if v is None else v


def tied_output_weights(model: nn.Module) -> set[str]:
    """State-dict names of the output projection's weight when the config ties it to the input
    embedding (a checkpoint then holds the embedding alone), else empty. The HF model names its own
    head (``get_output_embeddings``), so this holds for any family, adapter or not."""
    head = model.get_output_embeddings()
    if head is None or not getattr(model.config, "tie_word_embeddings", False):
        return set()
    return {f"{n}.weight" for n, m in model.named_modules() if m is head}


class Adapter:
    """Subclass per model family; register an instance with ``lowbit_register_architectures``.

    Class attributes are the family's fixed facts; the methods derive the rest from a layer or a
    config. A subclass overrides :meth:`groups` and :meth:`linear_shapes` at least.
    """

    #: adapter name (``lowbit plugins`` shows it)
    name: ClassVar[str] = ""
    #: HF ``config.model_type`` values it serves
    model_types: ClassVar[tuple[str, ...]] = ()
    #: path of the ModuleList of decoder layers
    layers_path: ClassVar[str] = "model.layers"
    #: (lowbit prefix, checkpoint prefix) pairs of paths inside a decoder layer, where AutoAWQ and
    #: GPTQModel name a module differently from lowbit's module tree (Mixtral: ``mlp.`` ↔
    #: ``block_sparse_moe.``)
    checkpoint_renames: ClassVar[tuple[tuple[str, str], ...]] = ()
    #: paths, from the model root, of the token embedding, the final norm and the output projection
    #: (the HF names most families share; a family laid out otherwise overrides them)
    embedding: ClassVar[str] = "model.embed_tokens"
    final_norm: ClassVar[str] = "model.norm"
    lm_head: ClassVar[str] = "lm_head"
    #: paths, from the model root, of modules outside the decoder layers that stay float and that a
    #: consumer must not convert to quantized linears (a vision tower); AutoAWQ-style configs list them
    #: in modules_to_not_convert
    float_modules: ClassVar[tuple[str, ...]] = ()

    def __init__(self, name: str | None = None, model_types: tuple[str, ...] | None = None,
                 layers_path: str | None = None):
        """Override the class's ``name``, ``model_types`` or ``layers_path`` for this instance: a family
        laid out like llama's is ``LlamaAdapter("granite", ("granite",))``."""
        if name is not None:
            self.name = name
        if model_types is not None:
            self.model_types = tuple(model_types)
        if layers_path is not None:
            self.layers_path = layers_path

    # -- the module tree ------------------------------------------------------------------------

    def prepare(self, model: nn.Module) -> None:
        """Put ``model`` in the form lowbit quantizes, in place and idempotently (a MoE family splits
        its fused expert tensors into one ``nn.Linear`` per expert linear). The default does nothing."""

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers, after :meth:`prepare`."""
        self.prepare(model)
        return model.get_submodule(self.layers_path)

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers_path}.{index}."

    def groups(self, layer: nn.Module) -> list[LinearGroup]:
        """Every linear of ``layer`` that lowbit quantizes, grouped by shared input (AWQ's groups)."""
        raise NotImplementedError

    def blocks(self, layer: nn.Module) -> dict[str, str]:
        """Blocks whose output is one linear's output (``{"mlp": "mlp.down_proj"}``): the pass may
        replay them from captured inputs. Empty is always correct, only slower."""
        return {}

    # -- facts from the config alone ------------------------------------------------------------

    def linear_shapes(self, config: Any) -> dict[str, tuple[int, int]]:
        """``(N, K)`` (out, in) of every quantized linear, keyed by its leaf path inside a decoder
        layer (the union over the family's layer kinds); empty when the config lacks the sizes."""
        raise NotImplementedError

    def in_features(self, config: Any) -> dict[str, int]:
        """Input widths of the quantized linears (what a group size must divide), checked before
        loading: one entry per width, named by the linears that have it."""
        by_k: dict[int, list[str]] = {}
        for leaf, (_n, k) in self.linear_shapes(config).items():
            by_k.setdefault(k, []).append(leaf)
        return {", ".join(ls[:3]) + (f" (+{len(ls) - 3} more)" if len(ls) > 3 else ""): k for k, ls in by_k.items()}

    def layer_roles(self, config: Any) -> dict[str, str]:
        """Role (one of :data:`LAYER_ROLES`) → path inside a decoder layer, for the modules every
        layer of this model has: what lets an algorithm or a format speak of "the query projection"
        or "the norm feeding the MLP" without naming a family's modules (AWQ leaves q and k
        unclipped; xFT maps roles to its file names). A role the family lacks is absent; the default
        knows none."""
        return {}

    def biased_linears(self, config: Any) -> set[str]:
        """Paths inside a decoder layer of the quantized linears that carry a bias in this model
        (a format that can store some biases only refuses the rest before quantizing)."""
        return set()

    # -- names on disk --------------------------------------------------------------------------

    def checkpoint_name(self, name: str) -> str:
        """The tensor or module name AutoAWQ / GPTQModel checkpoints use for lowbit's ``name``."""
        return self._rename(name, 0, 1)

    def lowbit_name(self, name: str) -> str:
        """Inverse of :meth:`checkpoint_name`."""
        return self._rename(name, 1, 0)

    def _rename(self, name: str, src: int, dst: int) -> str:
        m = re.match(rf"^({re.escape(self.layers_path)}\.\d+\.)(.+)$", name)
        if m:
            for pair in self.checkpoint_renames:
                if m.group(2).startswith(pair[src]):
                    return m.group(1) + pair[dst] + m.group(2)[len(pair[src]):]
        return name

    def layer_leaf(self, name: str) -> str | None:
        """``name``'s path inside its decoder layer (``self_attn.q_proj``), or None outside the layers."""
        m = re.match(rf"^{re.escape(self.layers_path)}\.\d+\.(.+)$", name)
        return m.group(1) if m else None


def adapter_for(config: Any, architectures: Registry) -> Adapter:
    """The adapter in ``architectures`` (``lowbit.registry("architectures")``: the installed ones) for
    an HF config (object or dict), or one line naming the supported model types."""
    model_type = config_get(config, "model_type")
    if model_type not in architectures:
        raise ModelLoadError(
            f"architecture {model_type!r} is not supported; supported: {', '.join(architectures.names())}. "
            "A plugin can add it through lowbit_register_architectures."
        )
    return architectures.get(model_type)


def adapter_or_none(config: Any, architectures: Registry) -> Adapter | None:
    """The adapter in ``architectures`` for ``config``, or None when none serves its model type
    (readers of foreign checkpoints then keep the names as they are and skip the shape checks)."""
    model_type = config_get(config, "model_type")
    return architectures.get(model_type) if model_type in architectures else None
