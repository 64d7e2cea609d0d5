"""QuantLinear and building a runnable model from a QuantizedModel."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .errors import CheckpointError
from .kernels.base import KernelSpec
from .models import adapter_or_none
from .qmodel import QuantizedModel
from .qweight import QuantizedWeight
from .selection import select_kernel


class QuantLinear(nn.Module):
    """Drop-in for ``nn.Linear`` over a QuantizedWeight, run by the kernel selection picks."""

    def __init__(self, qweight: QuantizedWeight, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.bfloat16, kernel: str | None = None):
        super().__init__()
        device = torch.device(device)
        self.in_features = qweight.in_features
        self.out_features = qweight.out_features
        self.scheme = qweight.scheme
        kernel_cls = select_kernel(KernelSpec.of(qweight, dtype), device, kernel)
        self.kernel = kernel_cls(qweight, device, dtype)
        self.kernel_name = kernel_cls.name
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel.forward(x.to(self.dtype))

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.scheme.describe()}, kernel={self.kernel_name}"


def _no_init():
    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def _skeleton(qmodel: QuantizedModel, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with _no_init():
        model = AutoModelForCausalLM.from_config(qmodel.config, dtype=dtype)
    adapter = adapter_or_none(qmodel.config)
    if adapter is not None:  # the module tree lowbit quantized (MoE experts split into linears)
        adapter.prepare(model)
    return model.eval()


def _load_floats(model: nn.Module, tensors: dict[str, torch.Tensor], skip: set[str], dtype: torch.dtype) -> None:
    expected = {k for k in model.state_dict() if k.rpartition(".")[0] not in skip}
    if getattr(model.config, "tie_word_embeddings", False):
        expected.discard("lm_head.weight")
    missing = sorted(expected - set(tensors))
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:3]}.")
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items() if k in expected}
    model.load_state_dict(state, strict=False)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()


def build_model(qmodel: QuantizedModel, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
                kernel: str | None = None, progress: bool = False) -> nn.Module:
    """An HF causal LM whose quantized linears are QuantLinear (kernels chosen per layer)."""
    model = _skeleton(qmodel, dtype)
    for path, qw in qmodel.qweights.items():
        parent, _, leaf = path.rpartition(".")
        try:
            old = model.get_submodule(path)
        except AttributeError as err:
            raise CheckpointError(f"checkpoint quantizes {path}, which this model does not have.") from err
        if (old.out_features, old.in_features) != (qw.out_features, qw.in_features):
            raise CheckpointError(
                f"{path}: checkpoint holds {qw.out_features}x{qw.in_features}, the config says "
                f"{old.out_features}x{old.in_features}."
            )
        setattr(model.get_submodule(parent), leaf, QuantLinear(qw, device, dtype, kernel))
    _load_floats(model, qmodel.float_tensors, set(qmodel.qweights), dtype)
    return model.to(device)


def build_float_model(qmodel: QuantizedModel, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The same model with every quantized weight dequantized into a plain ``nn.Linear``."""
    model = _skeleton(qmodel, dtype)
    state = dict(qmodel.float_tensors)
    for path, qw in qmodel.qweights.items():
        state[f"{path}.weight"] = qw.dequantize(dtype)
        if qw.bias is not None:
            state[f"{path}.bias"] = qw.bias
    _load_floats(model, state, set(), dtype)
    return model


def kernels_used(model: nn.Module) -> dict[str, int]:
    """Kernel name → number of QuantLinear layers running on it."""
    out: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QuantLinear):
            out[m.kernel_name] = out.get(m.kernel_name, 0) + 1
    return out
