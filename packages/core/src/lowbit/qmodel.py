"""QuantizedModel: a whole quantized checkpoint in memory, independent of any format."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

from .qweight import QuantizedWeight
from .scheme import QuantScheme


@dataclass
class QuantizedModel:
    """:param config: the HF model config (``transformers.PretrainedConfig``).
    :param scheme: the scheme every quantized linear uses.
    :param qweights: module path (the decoder layer's path, then the linear's path inside it, as
        the family's architecture adapter names them) → QuantizedWeight.
    :param float_tensors: every other parameter (embeddings, norms, lm_head) by HF name.
    :param tokenizer: a tokenizer with ``save_pretrained``, or None.
    :param generation_config: optional ``transformers.GenerationConfig``.
    :param manifest: recipe, calibration, source and versions (lowbit.json).
    :param adapter: the model family's :class:`lowbit.models.Adapter` (formats ask it for the
        family's names and roles), or None where no registered adapter serves the model type;
        :func:`lowbit.exporting.read_checkpoint` and :func:`~lowbit.exporting.export` supply it.
    """

    config: Any
    scheme: QuantScheme
    qweights: dict[str, QuantizedWeight]
    float_tensors: dict[str, torch.Tensor]
    tokenizer: Any = None
    generation_config: Any = None
    manifest: dict = field(default_factory=dict)
    adapter: Any = None

    def tensor_hash(self) -> str:
        """sha256 over every quantized tensor's name, dtype, shape and bytes, in name order."""
        return _sha256((f"{name}.{tname}", t) for name in sorted(self.qweights)
                       for tname, t in sorted(self.qweights[name].tensors().items()))

    def float_hash(self) -> str:
        """sha256 over every float tensor (embeddings, norms, lm_head…) the same way: with
        tensor_hash it covers every tensor of a checkpoint, so a flipped byte or an added or
        removed tensor anywhere is caught on read."""
        chunked = getattr(self.float_tensors, "chunked", None)  # a lazily read checkpoint: in row chunks
        return _sha256((name, chunked(name) if chunked else self.float_tensors[name]) for name in sorted(self.float_tensors))

    def diff(self, other: QuantizedModel) -> dict[str, list[str]]:
        """Module → list of differences in decoded codes/scales/zeros/g_idx (empty dict: identical)."""
        out: dict[str, list[str]] = {}
        for name in sorted(set(self.qweights) | set(other.qweights)):
            if name not in self.qweights or name not in other.qweights:
                out[name] = ["present in only one checkpoint"]
                continue
            d = self.qweights[name].diff(other.qweights[name])
            if d:
                out[name] = d
        return out


def _sha256(named_tensors) -> str:
    """sha256 over ``(name, tensor)`` pairs: each one's name, dtype, shape, then its bytes. A value
    may be :class:`lowbit.hf.TensorChunks` (hashed chunk by chunk, never held whole)."""
    h = hashlib.sha256()
    for name, t in named_tensors:
        chunks = t.chunks() if hasattr(t, "chunks") else [t]
        h.update(f"{name}:{t.dtype}:{list(t.shape)}".encode())
        for c in chunks:
            c = c.detach().contiguous().cpu()
            if c.numel():
                h.update(c.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()
