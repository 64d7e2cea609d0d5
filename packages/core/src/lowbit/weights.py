"""Float weights one decoder layer at a time: a model skeleton whose parameters live on the meta
device, filled from a :class:`WeightSource` just before a layer is quantized and emptied after.

This is what lets the pass quantize models larger than RAM: the float checkpoint's safetensors
shards are memory-mapped and each tensor is read (and cast to the compute dtype) only when its
layer comes up, so peak memory is one layer plus activations, whatever the number of layers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .errors import ModelLoadError
from .finite import check_source_tensor, checked_chunks
from .hf import LazyTensors, TensorChunks


class WeightSource(Mapping):
    """Float tensors by the model's parameter names, read on access. ``from_dir``: a directory's safetensors
    shards (memory-mapped; every shard's header is checked when opened); ``from_module``: a model already
    in memory (its state dict).

    ``rename`` maps a name the files lack to the one they store it under (the family adapter's
    ``checkpoint_name``: Mixtral's experts are ``block_sparse_moe.*`` on disk, ``mlp.*`` in lowbit's tree);
    membership is answered from the names alone, without reading a tensor."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], where: str, rename=None):
        self._tensors, self.where, self._rename = tensors, where, rename

    @classmethod
    def from_dir(cls, path: str | Path, rename=None) -> WeightSource:
        return cls(LazyTensors(Path(path), error=ModelLoadError), str(path), rename)

    @classmethod
    def from_module(cls, model: nn.Module) -> WeightSource:
        return cls(model.state_dict(), "memory")

    def stored_name(self, name: str) -> str:
        """The name ``name`` is stored under (itself, or its renaming where only that is stored)."""
        if name in self._tensors or self._rename is None:
            return name
        return self._rename(name)

    def __getitem__(self, name: str) -> torch.Tensor:
        stored = self.stored_name(name)
        return check_source_tensor(self._tensors[stored], stored, self.where)  # as read: NaN stops the run here

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.stored_name(name) in self._tensors

    def chunked(self, name: str, dtype: torch.dtype) -> torch.Tensor | TensorChunks:
        """``name`` cast to ``dtype``, as row chunks when read from files (never whole in memory)."""
        if isinstance(self._tensors, LazyTensors):
            stored = self.stored_name(name)
            c = self._tensors.chunked(stored, dtype)
            return TensorChunks(c.dtype, c.shape, lambda: checked_chunks(c.chunks(), stored, self.where))
        return self[name].to(dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


@contextmanager
def _parameters_on_meta():
    """Modules built inside get their parameters on the meta device (no memory, no init work);
    buffers stay real, so values computed in ``__init__`` (rotary frequencies) are right."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param):
        original(module, name, param)
        p = module._parameters.get(name)
        if p is not None and p.device.type != "meta":
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def empty_model(config, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM ``config`` describes, parameters on the meta device, in eval mode."""
    from transformers import AutoModelForCausalLM

    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return model.eval()


def missing_tensors(model: nn.Module, source: Mapping[str, torch.Tensor]) -> list[str]:
    """Parameter names of ``model`` that ``source`` lacks (tied copies excluded)."""
    seen: set[int] = set()
    out = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        if name not in source:
            out.append(name)
    return out


def materialize_named(module: nn.Module, names: list[str], source: Mapping[str, torch.Tensor] | None,
                      dtype: torch.dtype | None = torch.float32, device: torch.device | str = "cpu",
                      prefix: str = "") -> None:
    """Fill the parameters ``names`` of ``module`` from ``source[prefix + name]`` cast to ``dtype``
    (None: as stored); nothing when ``source`` is None (the module is already in memory)."""
    if source is None:
        return
    params = dict(module.named_parameters(remove_duplicate=False))
    for name in names:
        try:
            t = source[prefix + name]
        except KeyError:
            raise ModelLoadError(f"the checkpoint has no tensor {prefix + name}; is it complete?") from None
        if list(t.shape) != list(params[name].shape):
            raise ModelLoadError(f"{prefix + name} is {list(t.shape)} in the checkpoint but the config implies "
                                 f"{list(params[name].shape)}; config and weights disagree.")
        owner, _, leaf = name.rpartition(".")
        mod = module.get_submodule(owner) if owner else module
        mod._parameters[leaf] = nn.Parameter(t.to(device=device, dtype=dtype or t.dtype), requires_grad=False)


def materialize(module: nn.Module, prefix: str, source: Mapping[str, torch.Tensor] | None,
                dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
    """Fill every parameter of ``module`` (and each persistent buffer the source holds) from
    ``source[prefix + name]``, cast to ``dtype`` on ``device``."""
    if source is None:
        return
    materialize_named(module, [n for n, _ in module.named_parameters()], source, dtype, device, prefix)
    for name, b in list(module.named_buffers()):
        if prefix + name in source:
            owner, _, leaf = name.rpartition(".")
            mod = module.get_submodule(owner) if owner else module
            mod._buffers[leaf] = source[prefix + name].to(device=device, dtype=b.dtype)


def release(module: nn.Module, names: list[str] | None = None) -> None:
    """Put ``module``'s parameters (or only ``names``) back on the meta device, freeing their memory."""
    wanted = None if names is None else set(names)
    for name, p in list(module.named_parameters(remove_duplicate=False)):
        if (wanted is None or name in wanted) and p.device.type != "meta":
            owner, _, leaf = name.rpartition(".")
            mod = module.get_submodule(owner) if owner else module
            mod._parameters[leaf] = nn.Parameter(p.to("meta"), requires_grad=False)


def is_materialized(module: nn.Module) -> bool:
    return any(p.device.type != "meta" for p in module.parameters())
