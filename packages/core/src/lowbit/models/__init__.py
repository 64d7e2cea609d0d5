"""Architecture adapters, one module per model family (see :mod:`lowbit.models.base`)."""

from __future__ import annotations

from .base import LAYER_ROLES, Adapter, adapter_for, adapter_or_none, config_get, tied_output_weights
from .gemma import Gemma3VisionAdapter, GemmaAdapter
from .llama import LLAMA_FAMILY, LlamaAdapter
from .mixtral import MixtralAdapter
from .phi3 import Phi3Adapter
from .qwen_moe import QwenMoeAdapter

#: the adapters lowbit registers itself (``_builtin``)
BUILTIN = (LLAMA_FAMILY, Phi3Adapter(), GemmaAdapter(), Gemma3VisionAdapter(), MixtralAdapter(), QwenMoeAdapter())

__all__ = ["BUILTIN", "LAYER_ROLES", "LLAMA_FAMILY", "Adapter", "Gemma3VisionAdapter", "GemmaAdapter", "LlamaAdapter",
           "MixtralAdapter", "Phi3Adapter", "QwenMoeAdapter", "adapter_for", "adapter_or_none", "config_get",
           "tied_output_weights"]
