"""QuantLinear and building a runnable model from a QuantizedModel."""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from ..errors import CheckpointError
from ..exporting import with_adapter
from ..finite import check_finite
from ..kernels.base import KernelSpec
from ..limits import check_fits, check_shapes, meta_model, parameter_bytes
from ..models import tied_output_weights
from ..qmodel import QuantizedModel
from ..qweight import QuantizedWeight
from ..selection import select_kernel


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
    adapter = with_adapter(qmodel).adapter
    if adapter is not None:  # the module tree lowbit quantized (MoE experts split into linears)
        adapter.prepare(model)
    return model.eval()


def check_sizes(qmodel: QuantizedModel, dtype: torch.dtype) -> None:
    """Refuse a checkpoint whose config disagrees with its tensors, or whose float model (what
    :func:`build_model` allocates before swapping in the quantized linears) does not fit in memory,
    before anything is allocated (:mod:`lowbit.limits`)."""
    qw, ft = qmodel.qweights, qmodel.float_tensors
    # a lazily read checkpoint's shapes come from its headers (nothing read, nothing unpacked)
    qshape = getattr(qw, "shape", lambda m: [qw[m].out_features, qw[m].in_features])
    fshape = getattr(ft, "shape", lambda n: list(ft[n].shape))
    shapes = {f"{m}.weight": list(qshape(m)) for m in qw}
    shapes.update({n: list(fshape(n)) for n in ft})
    meta = meta_model(qmodel.config, error=CheckpointError, where="the checkpoint", tensors_on_disk=len(shapes))
    check_shapes(meta, shapes, "the checkpoint", CheckpointError)
    total, _ = parameter_bytes(meta, dtype)
    check_fits(total, f"the checkpoint's model in {dtype}", "Free memory or use a machine with more.", CheckpointError)


def _load_floats(model: nn.Module, tensors: dict[str, torch.Tensor], skip: set[str], dtype: torch.dtype) -> None:
    expected = {k for k in model.state_dict() if k.rpartition(".")[0] not in skip}
    expected -= tied_output_weights(model)
    missing = sorted(expected - set(tensors))
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:3]}.")
    state = {k: check_finite(v, f"the checkpoint's tensor {k}", "Re-export the checkpoint from a sound model.",
                             CheckpointError).to(dtype) if v.is_floating_point() else v
             for k, v in tensors.items() if k in expected}
    model.load_state_dict(state, strict=False)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()


#: the native decoder's embedding modes (``--embedding``): the float table, or int8 rows (opt-in, native only)
EMBEDDINGS = ("float", "int8")
# load-time quantization of the float lm_head (opt-in): name → (bits, group size, symmetric)
LM_HEAD_SCHEMES = {"int8": (8, -1, True), "int4": (4, 64, False)}
#: ``--lm-head``: the checkpoint's float lm_head, or one of the load-time quantizations above
LM_HEADS = ("float", *LM_HEAD_SCHEMES)


def quantize_lm_head(model: nn.Module, mode: str, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace the float ``lm_head`` by a QuantLinear over its round-to-nearest quantization, in place.

    An opt-in at load time (bench/generate/eval), not part of the checkpoint: ``int8`` is per-channel
    symmetric 8-bit, ``int4`` 4-bit groups of 64 with a zero point. The lm_head of a small model is a
    large share of its weights (SmolLM2-135M: 49152 x 576, a third of all), and at decode it is read
    in full for every token. A tied lm_head is untied: the input embedding stays float.
    """
    from ..errors import LowbitError
    from ..primitives import quantize
    from ..scheme import QuantScheme

    if mode == "float":
        return model
    if mode not in LM_HEAD_SCHEMES:
        raise LowbitError(f"lm_head mode {mode!r} is not one of float, {', '.join(LM_HEAD_SCHEMES)}.")
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise LowbitError(f"the model's output layer is {type(head).__name__}, not a float nn.Linear; "
                          "it cannot be quantized at load time.")
    bits, gs, sym = LM_HEAD_SCHEMES[mode]
    scheme = QuantScheme(bits, gs if head.in_features % gs == 0 else -1, sym=sym)
    bias = None if head.bias is None else head.bias.detach().float()
    w = head.weight.detach()
    parts = [quantize(w[i:i + 4096].float(), scheme) for i in range(0, w.shape[0], 4096)]  # rows are independent;
    # chunks keep the fp32 temporaries of RTN small (the whole 49152 x 576 head would add ~0.5 GB of peak RSS)
    qw = QuantizedWeight(torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]),
                         torch.cat([p.zeros for p in parts]), scheme, bias=bias)
    del parts
    if getattr(model.config, "tie_word_embeddings", False):
        # the embedding keeps the float tensor; a copy of the config (it may be shared, e.g. with the
        # checkpoint's QuantizedModel) records that nothing is tied any more
        model.config = copy.copy(model.config)
        model.config.tie_word_embeddings = False
    model.set_output_embeddings(QuantLinear(qw, device, dtype))
    return model


def build_model(qmodel: QuantizedModel, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
                kernel: str | None = None, progress: bool = False, lm_head: str = "float") -> nn.Module:
    """An HF causal LM whose quantized linears are QuantLinear (kernels chosen per layer);
    ``lm_head``: ``float`` (as in the checkpoint) or ``int8``/``int4`` (see :func:`quantize_lm_head`)."""
    check_sizes(qmodel, dtype)
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
    quantize_lm_head(model, lm_head, device, dtype)
    return model.to(device)


def build_float_model(qmodel: QuantizedModel, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The same model with every quantized weight dequantized into a plain ``nn.Linear``.

    Each weight is dequantized straight into its parameter, one at a time, so the peak is the float model plus
    one weight (with a lazily read checkpoint, whose codes are read as each weight is, nothing more)."""
    model = _skeleton(qmodel, dtype)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for path in qmodel.qweights:
            qw = qmodel.qweights[path]
            w = check_finite(qw.dequantize(dtype), f"the checkpoint's weight {path}",
                             "Re-export the checkpoint from a sound model.", CheckpointError)
            params[f"{path}.weight"].copy_(w)
            if qw.bias is not None:
                params[f"{path}.bias"].copy_(qw.bias)
            del w, qw
    _load_floats(model, dict(qmodel.float_tensors), set(qmodel.qweights), dtype)
    return model


def kernels_used(model: nn.Module) -> dict[str, int]:
    """Kernel name → number of QuantLinear layers running on it."""
    out: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QuantLinear):
            out[m.kernel_name] = out.get(m.kernel_name, 0) + 1
    return out
