"""The quantization pipeline: check everything, load, run the recipe layer by layer, write.

The pass holds one decoder layer's activations at a time: the inputs of layer i+1 are the
outputs of the already-quantized layer i. Steps that need no calibration (RTN alone) skip the
forward passes entirely.
"""

from __future__ import annotations

import ctypes
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import calibration
from .algorithms.base import LayerContext, Quantizer
from .cpuinfo import has_fast_bf16_matmul
from .errors import LowbitError, UnsupportedSchemeError
from .exporting import check_formats
from .io import atomic_dir, check_writable, exclusive_output, fault_point
from .loading import ModelSource, load_config, load_generation_config, load_model, load_tokenizer, resolve
from .models import Adapter, adapter_for
from .plugins import registry
from .qmodel import QuantizedModel
from .scheme import QuantScheme

METHODS: dict[str, list[str]] = {
    "rtn": ["rtn"],
    "awq": ["awq", "rtn"],
    "gptq": ["gptq"],
    "awq+gptq": ["awq", "gptq"],
}


def fast_compute_dtype(flags: set[str] | None = None) -> torch.dtype:
    """The faster calibration dtype on this CPU (``--compute-dtype auto``): bf16 where the CPU has AMX
    (:func:`lowbit.cpuinfo.has_fast_bf16_matmul`), else fp32. It is not the default: on an AMX Xeon bf16
    made GPTQ W4 g64 on the demo model 1.7x faster (63 against 106 s) but its perplexity 0.4 % worse
    (20.411 against 20.326; benchmarks/quality/RESULTS.md). ``flags``: the CPU's flags (default: this
    machine's, from /proc/cpuinfo)."""
    return torch.bfloat16 if has_fast_bf16_matmul(flags) else torch.float32


def make_steps(method: str, scheme: QuantScheme, step_options: dict[str, dict] | None = None,
               quantize: bool = True) -> list[Quantizer]:
    """The recipe for ``method`` (a name in METHODS, or step names joined by ``+``)."""
    names = METHODS.get(method) or method.split("+")
    step_options = step_options or {}
    known = set(METHODS) | set(registry("quantizers").names())
    for n in names:
        if n not in registry("quantizers"):
            raise UnsupportedSchemeError(f"unknown method {method!r}; known: {', '.join(sorted(known))}.")
    steps = [registry("quantizers").get(n)(scheme, **step_options.get(n, {})) for n in names]
    if not quantize:
        steps = [s for s in steps if not s.quantizes]
        if not steps:
            raise UnsupportedSchemeError(f"method {method!r} has no transform step to export; use --method awq.")
    elif not steps[-1].quantizes:
        raise UnsupportedSchemeError(f"the last step of {method!r} must quantize (rtn or gptq), got {steps[-1].name}.")
    return steps


def linear_in_features(config) -> dict[str, int]:
    """Input width of each llama-family linear, from the config alone (checked before loading)."""
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    return {
        "q/k/v_proj, gate/up_proj": hidden,
        "o_proj": config.num_attention_heads * head_dim,
        "down_proj": config.intermediate_size,
    }


@dataclass
class PassReport:
    layers: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, adapter: Adapter, ids: torch.Tensor, batch_size: int, index: int = 0):
    """Run the model up to decoder layer ``index`` and record its inputs and keyword arguments per batch."""
    layer0 = adapter.layers(model)[index]
    inputs, kwargs = [], []

    def hook(_mod, args, kw):
        hidden = args[0] if args else kw.pop("hidden_states")
        inputs.append(hidden.detach())
        kw = {k: v for k, v in kw.items() if k not in ("past_key_values", "past_key_value")}
        kw["use_cache"] = False
        kwargs.append(kw)
        raise _Stop

    handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, ids.shape[0], batch_size):
            try:
                model(ids[start : start + batch_size], use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return inputs, kwargs


_LIBC: list = []


def return_freed_memory() -> bool:
    """Give freed memory back to the OS (glibc on Linux; True when done); called between layers.

    glibc raises its mmap threshold each time a large block is freed, after which heaps fragment and
    never shrink; with a threshold below an activation's size (its 128 KiB start, or the 4 MiB used
    before) every activation-sized tensor is a fresh mmap whose pages fault in again (a quarter of a
    GPTQ pass's time went to the kernel). So the thresholds are fixed:
    blocks under 64 MiB (a calibration batch's activations) come from the heap and stay mapped within
    a layer (no trim under 512 MiB free), and ``malloc_trim`` after each layer returns what the layer
    freed. Measured on a GPTQ W4 g64 pass (2 cores): 212 s against 234 s with a 4 MiB threshold, peak
    RSS 2.0 GiB against 1.9. Process-wide, cheap, and results are unchanged."""
    if not sys.platform.startswith("linux"):
        return False
    if not _LIBC:
        try:
            libc = ctypes.CDLL("libc.so.6")
            m_trim_threshold, m_mmap_threshold = -1, -3
            libc.mallopt(m_mmap_threshold, 64 << 20)
            libc.mallopt(m_trim_threshold, 512 << 20)
            _LIBC.append(libc)
        except (OSError, AttributeError):  # musl or no libc.so.6: keep the allocator's defaults
            _LIBC.append(None)
    if _LIBC[0] is None:
        return False
    _LIBC[0].malloc_trim(0)
    return True


def _rel_error(ref: list[torch.Tensor], out: list[torch.Tensor]) -> float:
    num = sum(float((a.float() - b.float()).pow(2).sum()) for a, b in zip(ref, out))
    den = sum(float(a.float().pow(2).sum()) for a in ref)
    return (num / max(den, 1e-30)) ** 0.5


def run_pass(model: nn.Module, adapter: Adapter, steps: list[Quantizer], scheme: QuantScheme,
             ids: torch.Tensor | None, batch_size: int = 8, compute_dtype: torch.dtype = torch.float32,
             progress: bool = True, report_batches: int | None = 1) -> tuple[dict, PassReport]:
    """Run ``steps`` on every decoder layer; returns (qweights by module path, report).

    ``compute_dtype``: the calibration forwards' matmul dtype (bf16: see :func:`fast_compute_dtype`). Each layer's output
    error (quantized vs float layer, on the same quantized-model inputs) is measured on the first
    ``report_batches`` calibration batches (None: all; default one batch, 8 × 512 tokens at the
    defaults), so the float reference costs a fraction of a forward."""
    t0 = time.perf_counter()
    return_freed_memory()
    layers = adapter.layers(model)
    needs_data = any(s.needs_calibration for s in steps)
    quantizes = steps[-1].quantizes
    if needs_data:
        inputs, kwargs = capture_layer_inputs(model, adapter, ids, batch_size)
    else:
        inputs, kwargs = [], []
    for s in steps:
        s.prepare(model, adapter)
    qweights: dict = {}
    report = PassReport()
    bar = tqdm(total=len(layers), desc="quantizing", unit="layer", disable=not progress)
    for i, layer in enumerate(layers):
        ctx = LayerContext(i, adapter.layer_prefix(i), layer, adapter.groups(layer), scheme, inputs, kwargs,
                           qweights=qweights, compute_dtype=compute_dtype, blocks=adapter.blocks(layer),
                           report_batches=report_batches)
        if needs_data and not steps[0].records_reference:
            ctx.reference_outputs()  # before any step changes the layer
        for s in steps:
            bar.set_postfix_str(f"layer {i} {s.name}")
            ctx.replays.clear()  # a step may change any weight: only the last step's replays reach the forward
            s.apply(ctx)
        if quantizes and ctx.unquantized():
            raise LowbitError(f"layer {i}: {', '.join(ctx.unquantized())} left unquantized by {steps[-1].name} (a bug).")
        row: dict[str, Any] = {"layer": i, **ctx.report}
        if needs_data:
            ref = ctx.reference
            if ref is None:
                raise LowbitError(f"layer {i}: {steps[0].name} declares records_reference but recorded none (a bug).")
            inputs = ctx.forward()
            row["output_rel_error"] = _rel_error(ref, inputs[: len(ref)])
            row["error_samples"] = sum(x.shape[0] for x in ref)
            bar.set_postfix_str(f"layer {i} err {row['output_rel_error']:.4f}")
        report.layers.append(row)
        ctx.replays.clear()  # captured activations go before the trim, not with the next layer's context
        return_freed_memory()
        bar.update()
        fault_point("layer")  # tests kill a run here (mid-calibration)
    bar.close()
    for s in steps:
        s.finish()
    report.seconds = time.perf_counter() - t0
    return qweights, report


def float_tensors_of(model: nn.Module, qweights: dict) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer not held by a QuantizedWeight (tied lm_head dropped)."""
    out = {}
    for name, t in model.state_dict().items():
        mod, _, leaf = name.rpartition(".")
        if mod in qweights and leaf in ("weight", "bias"):
            continue
        out[name] = t.detach().clone()
    if getattr(model.config, "tie_word_embeddings", False):
        out.pop("lm_head.weight", None)
    return out


@dataclass
class Plan:
    """Everything checked before the long work starts."""

    source: ModelSource
    config: Any
    adapter: Adapter
    steps: list[Quantizer]
    scheme: QuantScheme
    formats: list[str]
    out: Path | None


def plan(model: str | None, method: str, scheme: QuantScheme, formats: list[str] | None = None,
         out: str | Path | None = None, step_options: dict | None = None, overwrite: bool = False,
         trust_remote_code: bool = False, export_compatible: bool = False) -> Plan:
    steps = make_steps(method, scheme, step_options, quantize=not export_compatible)
    src = resolve(model)
    config = load_config(src, trust_remote_code)
    adapter = adapter_for(config)
    for name, k in linear_in_features(config).items():
        scheme.check_shape(k, name)
    formats = list(formats or [])
    for f in formats:
        registry("exporters").get(f)
    check_formats(formats, scheme, config)
    if out is not None:
        out = check_writable(out, overwrite)
    return Plan(src, config, adapter, steps, scheme, formats, out)


@exclusive_output  # the output is ours from the first check to the final rename
def quantize(model: str | None = None, *, method: str = "rtn", scheme: QuantScheme | None = None,
             calib: str = "wikitext2", nsamples: int = 128, seqlen: int = 512, batch_size: int = 8,
             step_options: dict[str, dict] | None = None, formats: list[str] | None = None,
             out: str | Path | None = None, overwrite: bool = False, trust_remote_code: bool = False,
             compute_dtype: torch.dtype = torch.float32, progress: bool = True) -> QuantizedModel:
    """Quantize ``model`` (None: the demo model) and, with ``out``, write ``out/<format>`` for each
    of ``formats`` (lowbit's own checkpoint is always written first)."""
    scheme = scheme or QuantScheme()
    formats = ["lowbit"] + [f for f in (formats or []) if f != "lowbit"]
    p = plan(model, method, scheme, formats, out, step_options, overwrite, trust_remote_code)
    return_freed_memory()
    tokenizer = load_tokenizer(p.source, trust_remote_code)
    ids = None
    calib_info = None
    if any(s.needs_calibration for s in p.steps):
        ids = calibration.samples(tokenizer, calibration.load_text(calib), nsamples, seqlen)
        calib_info = calibration.fingerprint(calib, ids)
    fmodel = load_model(p.source, torch.float32, trust_remote_code)
    qweights, report = run_pass(fmodel, p.adapter, p.steps, scheme, ids, batch_size, compute_dtype, progress)
    manifest = {
        "source": {"model": p.source.spec, "path": p.source.path, "gguf_file": p.source.gguf_file},
        "recipe": {"method": method, "steps": [{"name": s.name, "options": _jsonable(s.opts)} for s in p.steps]},
        "calibration": calib_info,
        "report": {"seconds": round(report.seconds, 2), "layers": report.layers},
    }
    qmodel = QuantizedModel(fmodel.config, scheme, qweights, float_tensors_of(fmodel, qweights), tokenizer,
                            load_generation_config(p.source), manifest)
    if out is not None:
        write(qmodel, formats, Path(out), overwrite)
    return qmodel


def write(qmodel: QuantizedModel, formats: list[str], out: Path, overwrite: bool = False) -> dict[str, Path]:
    """Write every format into ``out/<format>``, atomically as a whole."""
    with atomic_dir(out, overwrite) as tmp:
        for f in formats:
            (tmp / f).mkdir()
            registry("exporters").get(f)().write(qmodel, tmp / f)
    return {f: out / f for f in formats}


@exclusive_output
def export_compatible(model: str | None, out: str | Path, *, method: str = "awq", scheme: QuantScheme,
                      calib: str = "wikitext2", nsamples: int = 128, seqlen: int = 512, batch_size: int = 8,
                      step_options: dict | None = None, overwrite: bool = False, trust_remote_code: bool = False,
                      compute_dtype: torch.dtype = torch.float32, progress: bool = True) -> Path:
    """Run only the recipe's transform steps (AWQ scaling and clipping) and save the float model as
    a plain HF checkpoint with no quantization_config, for any other GPTQ tool."""
    p = plan(model, method, scheme, [], out, step_options, overwrite, trust_remote_code, export_compatible=True)
    tokenizer = load_tokenizer(p.source, trust_remote_code)
    ids = calibration.samples(tokenizer, calibration.load_text(calib), nsamples, seqlen)
    fmodel = load_model(p.source, torch.float32, trust_remote_code)
    run_pass(fmodel, p.adapter, p.steps, scheme, ids, batch_size, compute_dtype, progress)
    with atomic_dir(out, overwrite) as tmp:
        fmodel.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
    return Path(out)


def _jsonable(opts: dict) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in opts.items()}
