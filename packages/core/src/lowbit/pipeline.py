"""The quantization pipeline: check everything, load, run the recipe layer by layer, write.

The pass holds one decoder layer's activations at a time: the inputs of layer i+1 are the
outputs of the already-quantized layer i. Steps that need no calibration (RTN alone) skip the
forward passes entirely.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import calibration
from .algorithms.base import LayerContext, Quantizer
from .algorithms.context import StopForward
from .checkpoint import CheckpointWriter, LowbitCheckpoint
from .cpuinfo import has_fast_bf16_matmul
from .errors import LowbitError, ModelLoadError, OutputError, UnsupportedSchemeError
from .exporting import check_formats
from .heap import return_freed_memory
from .hf import ShardWriter, TensorChunks, write_config
from .io import atomic_dir, check_writable, exclusive_output, fault_point, link_tree
from .limits import check_activation_memory, check_fits, parameter_bytes
from .loading import (
    ModelSource,
    load_config,
    load_generation_config,
    load_model,
    load_tokenizer,
    resolve,
    resolve_local,
)
from .models import Adapter, adapter_for, tied_output_weights
from .plugins import get_plugin_manager, registry
from .qmodel import QuantizedModel
from .qweight import QuantizedWeight
from .recipe import Recipe
from .registry import Registry
from .weights import WeightSource, empty_model, materialize, materialize_named, missing_tensors, release
from .workdir import WorkDir, work_dir_for


def fast_compute_dtype(flags: set[str] | None = None) -> torch.dtype:
    """The faster calibration dtype on this CPU (``--compute-dtype auto``): bf16 where the CPU has AMX
    (:func:`lowbit.cpuinfo.has_fast_bf16_matmul`), else fp32. It is not the default: bf16 is faster but
    measurably worse (benchmarks/NOTES.md). ``flags``: the CPU's flags (default: this machine's, from
    /proc/cpuinfo)."""
    return torch.bfloat16 if has_fast_bf16_matmul(flags) else torch.float32


def make_steps(recipe: Recipe, quantize: bool = True, quantizers: Registry | None = None) -> list[Quantizer]:
    """The recipe's steps from ``quantizers`` (default: the installed plugins'; see :meth:`Recipe.steps`)."""
    return recipe.steps(quantizers if quantizers is not None else registry("quantizers"), quantize)


@dataclass
class PassReport:
    layers: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, adapter: Adapter, ids: torch.Tensor, batch_size: int, index: int = 0):
    """Run the model up to decoder layer ``index`` and record its inputs and keyword arguments per batch."""
    check_activation_memory(model.config, ids)
    layer0 = adapter.layers(model)[index]
    inputs, kwargs = [], []

    def hook(_mod, args, kw):
        hidden = args[0] if args else kw.pop("hidden_states")
        inputs.append(hidden.detach())
        kw = {k: v for k, v in kw.items() if k not in ("past_key_values", "past_key_value")}
        kw["use_cache"] = False
        kwargs.append(kw)
        raise StopForward

    handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, ids.shape[0], batch_size):
            try:
                model(ids[start : start + batch_size], use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
    return inputs, kwargs


def _rel_error(ref: list[torch.Tensor], out: list[torch.Tensor]) -> float:
    num = sum(float((a.float() - b.float()).pow(2).sum()) for a, b in zip(ref, out))
    den = sum(float(a.float().pow(2).sum()) for a in ref)
    return (num / max(den, 1e-30)) ** 0.5


def _to(obj, device: torch.device):
    """``obj`` (tensors and QuantizedWeights in lists, tuples and dicts) on ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, QuantizedWeight):
        return dataclasses.replace(obj, **{f: _to(getattr(obj, f), device)
                                           for f in ("codes", "scales", "zeros", "g_idx", "bias")})
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def rss_bytes() -> tuple[int, int]:
    """(current, peak) resident set size of this process in bytes (0 where unknown)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"), peak
    except (OSError, ValueError, IndexError):
        return 0, peak


def _outer_names(model: nn.Module, adapter: Adapter) -> list[str]:
    """Parameters outside the decoder layers that the forward up to layer 0 reads (all but the head)."""
    head = model.get_output_embeddings()
    skip = [adapter.layers_path + "."] + [n + "." for n, m in model.named_modules() if head is not None and m is head]
    return [n for n, _ in model.named_parameters() if not n.startswith(tuple(skip))]


def layer_float_tensors(layer: nn.Module, prefix: str, qweights: dict) -> dict[str, torch.Tensor]:
    """A finished layer's tensors that no QuantizedWeight holds (norms, biases of float linears), on the CPU."""
    out = {}
    for name, t in layer.state_dict().items():
        mod, _, leaf = (prefix + name).rpartition(".")
        if mod in qweights and leaf in ("weight", "bias"):
            continue
        out[prefix + name] = t.detach().to("cpu", copy=True)
    return out


def run_pass(model: nn.Module, adapter: Adapter, steps: list[Quantizer], recipe: Recipe,
             ids: torch.Tensor | None, *, progress: bool = True, report_batches: int | None = 1,
             source: Mapping[str, torch.Tensor] | None = None,
             on_layer: Callable[[int, dict, dict, list | None, dict], None] | None = None, start: int = 0,
             start_inputs: list[torch.Tensor] | None = None) -> tuple[dict, PassReport]:
    """Run ``steps`` (built from ``recipe``, whose scheme, batch size, compute dtype and device the
    pass uses) on every decoder layer; returns (qweights by module path, report).

    ``model`` is either a float model in memory or, with ``source``, a skeleton whose parameters are
    on the meta device (:func:`lowbit.weights.empty_model`): then each layer is filled from
    ``source`` just before its steps and emptied after, and the parameters outside the layers only
    for the calibration capture, so one layer's weights are in memory at a time. ``on_layer(index,
    qweights, float_tensors, next_inputs, report_row)`` receives each finished layer's quantized
    linears, its other tensors, the calibration activations it hands on (None without calibration)
    and its report row; they are then not kept (the returned qweights are empty); without it every
    layer's qweights are returned. ``recipe.device``: where layers and activations go for the steps (one
    layer at a time). ``start``, ``start_inputs``: begin at that layer with those activations (a
    resumed run; the layers before it are not touched).

    ``recipe.compute_dtype``: the calibration forwards' matmul dtype (bf16: see :func:`fast_compute_dtype`). Each layer's output
    error (quantized vs float layer, on the same quantized-model inputs) is measured on the first
    ``report_batches`` calibration batches (None: all; default one batch, 8 × 512 tokens at the
    defaults), so the float reference costs a fraction of a forward."""
    t0 = time.perf_counter()
    return_freed_memory()
    scheme, batch_size, compute_dtype = recipe.scheme, recipe.batch_size, recipe.compute_dtype
    device = torch.device(recipe.device)
    layers = adapter.layers(model)
    needs_data = any(s.needs_calibration for s in steps)
    quantizes = steps[-1].quantizes
    outer = _outer_names(model, adapter) if source is not None else []
    if needs_data:
        # embedding tables stay as stored (a large vocabulary in fp32 is over a GB) and their rows are
        # cast to float32 as they are looked up: exactly the values of a float32 table
        tables = [n for n in outer if isinstance(model.get_submodule(n.rpartition(".")[0]), nn.Embedding)]
        materialize_named(model, [n for n in outer if n not in tables], source)
        materialize_named(model, tables, source, dtype=None)
        upcasts = [model.get_submodule(n.rpartition(".")[0]).register_forward_hook(lambda _m, _a, y: y.float())
                   for n in tables] if source is not None else []
        try:
            inputs, kwargs = capture_layer_inputs(model, adapter, ids, batch_size)
        finally:
            for h in upcasts:
                h.remove()
        float_stream = any(s.needs_float_outputs for s in steps)
        fp_inputs = _float_stream_at(layers, adapter, start, inputs, kwargs, source) if float_stream else None
        if start_inputs is not None:
            inputs = start_inputs
        inputs, kwargs = _to(inputs, device), _to(kwargs, device)
        fp_inputs = _to(fp_inputs, device) if float_stream else None
        release(model, outer)
    else:
        inputs, kwargs, float_stream, fp_inputs = [], [], False, None
    qweights: dict = {}
    report = PassReport()
    bar = tqdm(total=len(layers), desc="quantizing", unit="layer", disable=not progress)
    bar.update(start)
    for i, layer in enumerate(layers):
        if i < start:
            continue
        t_layer = time.perf_counter()
        prefix = adapter.layer_prefix(i)
        if source is not None:
            materialize(layer, prefix, source, torch.float32, device)
        elif device.type != "cpu":
            layer.to(device)
        if i == start:  # steps may look at layer 0's weights (AWQ's results-file probe)
            if start and source is not None:
                materialize(layers[0], adapter.layer_prefix(0), source, torch.float32)
            for s in steps:
                s.prepare(model, adapter)
            if start and source is not None:
                release(layers[0])
        ctx = LayerContext(i, prefix, layer, adapter.groups(layer), scheme, inputs, kwargs,
                           qweights=qweights, compute_dtype=compute_dtype, blocks=adapter.blocks(layer),
                           report_batches=report_batches, drop_quantized=source is not None and not needs_data)
        if float_stream:  # the float model's own activations through the untouched layer, before any step
            quantized_inputs, ctx.inputs = ctx.inputs, fp_inputs
            ctx.float_outputs = ctx.forward()
            ctx.inputs = quantized_inputs
            fp_inputs = ctx.float_outputs
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
        ctx.replays.clear()  # captured activations go before the trim, not with the next layer's context
        del ctx
        if on_layer is not None:
            mine = {k: qweights.pop(k) for k in [k for k in qweights if k.startswith(prefix)]}
            done = (_to(mine, torch.device("cpu")), layer_float_tensors(layer, prefix, mine))
        if source is not None:
            release(layer)
        elif device.type != "cpu":
            layer.to("cpu")
        return_freed_memory()
        rss, peak = rss_bytes()
        row["seconds"] = round(time.perf_counter() - t_layer, 3)
        row["rss_mib"], row["peak_rss_mib"] = rss >> 20, peak >> 20
        if on_layer is not None:
            on_layer(i, *done, _to(inputs, torch.device("cpu")) if needs_data else None, row)
            del done
        report.layers.append(row)
        err = f" err {row['output_rel_error']:.4f}" if "output_rel_error" in row else ""
        bar.set_postfix_str(f"layer {i} {row['seconds']:.1f}s rss {rss / 2**30:.2f} GiB{err}")
        bar.update()
        fault_point("layer")  # tests kill a run here (mid-calibration)
    bar.close()
    for s in steps:
        s.finish()
    report.seconds = time.perf_counter() - t0
    return qweights, report


@torch.no_grad()
def _float_stream_at(layers, adapter: Adapter, start: int, inputs: list[torch.Tensor], kwargs: list[dict],
                     source) -> list[torch.Tensor]:
    """The float model's activations at layer ``start`` (its first layer's ``inputs`` run through the
    untouched float layers before it): what steps that want the float model's outputs as their target
    (``needs_float_outputs``) see when a run resumes part way."""
    xs = list(inputs)
    for i in range(start):
        layer = layers[i]
        if source is not None:
            materialize(layer, adapter.layer_prefix(i), source, torch.float32)
        outs = []
        for x, kw in zip(xs, kwargs):
            out = layer(x, **kw)
            outs.append((out[0] if isinstance(out, tuple) else out).to(x.dtype))
        xs = outs
        if source is not None:
            release(layer)
    return xs


def float_tensors_of(model: nn.Module, qweights: dict) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer not held by a QuantizedWeight (tied lm_head dropped)."""
    out = {}
    for name, t in model.state_dict().items():
        mod, _, leaf = name.rpartition(".")
        if mod in qweights and leaf in ("weight", "bias"):
            continue
        out[name] = t.detach().clone()
    for name in tied_output_weights(model):
        out.pop(name, None)
    return out


@dataclass
class Plan:
    """Everything checked before the long work starts."""

    source: ModelSource
    config: Any
    adapter: Adapter
    steps: list[Quantizer]
    recipe: Recipe
    out: Path | None
    registries: Mapping[str, Registry]


def plan(model: str | None, recipe: Recipe, out: str | Path | None = None, overwrite: bool = False,
         trust_remote_code: bool = False, export_compatible: bool = False,
         registries: Mapping[str, Registry] | None = None) -> Plan:
    """Check everything that can be checked before loading weights; ``registries`` (kind → Registry,
    default: the installed plugins') supply the steps, the family adapter and the formats."""
    registries = registries if registries is not None else get_plugin_manager().registries
    check_device(recipe.device)
    steps = make_steps(recipe, not export_compatible, registries["quantizers"])
    src = resolve(model)
    config = load_config(src, trust_remote_code)
    adapter = adapter_for(config, registries["architectures"])
    for name, k in adapter.in_features(config).items():  # from the config alone, before any weight is read
        recipe.scheme.check_shape(k, name)
    for f in recipe.formats:
        registries["exporters"].get(f)
    check_formats(["lowbit", *recipe.formats], recipe.scheme, config, registries["exporters"])
    if out is not None:
        out = check_writable(out, overwrite)
    return Plan(src, config, adapter, steps, recipe, out, registries)


def check_device(device: str) -> torch.device:
    """``device`` as a torch.device, or one line saying why it cannot run the calibration here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise UnsupportedSchemeError(f"--device {device!r} is not a device ({err}); use cpu, cuda or cuda:N.") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise UnsupportedSchemeError(f"--device {device} is not supported; use cpu, cuda or cuda:N.")
    if not torch.cuda.is_available():
        raise UnsupportedSchemeError(f"--device {device}: no CUDA device is visible to this torch "
                                     f"({torch.__version__}); use --device cpu or a CUDA build of torch.")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UnsupportedSchemeError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here.")
    return dev


def weights_of(src: ModelSource, config, trust_remote_code: bool = False,
               adapter: Adapter | None = None) -> tuple[nn.Module, WeightSource | None]:
    """(model, source) for the pass: a skeleton and its local safetensors shards when the model's
    tensors are stored under its modules' names (streamed, one layer in memory at a time; a hub id streams
    from its cached snapshot), else the whole float model loaded by transformers and no source, which is
    refused up front when it cannot fit in memory (saying why it cannot stream). A GGUF file streams
    from the float32 directory its first load converts it to (lowbit's cache).

    With the family ``adapter`` the skeleton is put in the form lowbit quantizes first (a MoE block's fused
    experts split into one linear per expert, as checkpoints store them) and names are looked up through
    its ``checkpoint_name`` (Mixtral's ``block_sparse_moe``), so MoE checkpoints stream too."""
    local = resolve_local(src, trust_remote_code)
    why = "its weights are not safetensors (e.g. pytorch_model.bin only) or a GGUF with the cache off"
    if local is not None:
        source = WeightSource.from_dir(local, rename=None if adapter is None else adapter.checkpoint_name)
        skeleton = empty_model(config, trust_remote_code)
        if adapter is not None:
            adapter.prepare(skeleton)
        missing = missing_tensors(skeleton, source)
        if not missing:
            return skeleton, source
        total, _ = parameter_bytes(skeleton, torch.float32)
        del skeleton
        why = f"its tensors are not stored under its modules' names (e.g. {missing[0]} is not in its files)"
    else:
        total, _ = parameter_bytes(empty_model(config, trust_remote_code), torch.float32)
    check_fits(total, f"{src.spec or 'the model'} cannot be streamed layer by layer ({why}); loading it whole in "
               "float32", "Convert it to safetensors named as its modules (save_pretrained), or use a machine with "
               "more memory.", ModelLoadError)
    return load_model(src, torch.float32, trust_remote_code), None


@exclusive_output  # the output is ours from the first check to the final rename
def quantize(model: str | None = None, recipe: Recipe | None = None, *, out: str | Path | None = None,
             overwrite: bool = False, resume: bool = False, trust_remote_code: bool = False, progress: bool = True,
             registries: Mapping[str, Registry] | None = None, **recipe_fields: Any) -> QuantizedModel:
    """Quantize ``model`` (None: the demo model) by ``recipe`` (or a :class:`Recipe` made of
    ``recipe_fields``: ``method``, ``scheme``, ``nsamples``...) and, with ``out``, write
    ``out/<format>`` for lowbit's own checkpoint and each of ``recipe.formats``.

    A model in local safetensors shards is streamed (:func:`weights_of`): one decoder layer in memory
    at a time, and with ``out`` each finished layer goes straight to the lowbit checkpoint's files,
    from which the other formats are written one tensor at a time, so memory does not grow with the
    number of layers. Without ``out`` the result is returned in memory.

    With ``out``, the lowbit checkpoint is built in a work directory beside it
    (:mod:`lowbit.workdir`); ``resume`` continues a killed run from its last finished layer (the same
    recipe required), giving the same bits as an uninterrupted run. The work directory goes once
    the output is complete."""
    recipe = recipe.replace(**recipe_fields) if recipe is not None else Recipe(**recipe_fields)
    scheme = recipe.scheme
    p = plan(model, recipe, out, overwrite, trust_remote_code, registries=registries)
    return_freed_memory()
    tokenizer = load_tokenizer(p.source, trust_remote_code)
    ids = None
    calib_info = None
    if any(s.needs_calibration for s in p.steps):
        ids = calibration.samples(tokenizer, calibration.load_text(recipe.calib), recipe.nsamples, recipe.seqlen)
        calib_info = calibration.fingerprint(recipe.calib, ids)
    fmodel, source = weights_of(p.source, p.config, trust_remote_code, p.adapter)
    manifest = {
        "source": {"model": p.source.spec, "path": p.source.path, "gguf_file": p.source.gguf_file},
        "recipe": {**recipe.to_dict(), "steps": [{"name": s.name, "options": _jsonable(s.opts)} for s in p.steps]},
        "calibration": calib_info,
    }
    generation_config = load_generation_config(p.source)
    run = dict(progress=progress, source=source)
    if out is None:
        qweights: dict = {}
        floats: dict = {}

        def keep(_i: int, q: dict, f: dict, _inputs, _row) -> None:
            qweights.update(q)
            floats.update(f)

        _, report = run_pass(fmodel, p.adapter, p.steps, recipe, ids, on_layer=keep, **run)
        floats.update(outer_float_tensors(fmodel, p.adapter, source))
        manifest["report"] = {"seconds": round(report.seconds, 2), "layers": report.layers}
        return QuantizedModel(fmodel.config, scheme, qweights, floats, tokenizer, generation_config, manifest,
                              adapter=p.adapter)
    out = Path(out)
    work = WorkDir(work_dir_for(out), {
        "model": manifest["source"], "files": _files_identity(p.source), "calibration": calib_info,
        "recipe": {k: v for k, v in manifest["recipe"].items() if k != "formats"},  # formats do not change layers
    })
    start = work.start(resume)
    if start and any(s.opts.get("dump") for s in p.steps):
        raise OutputError(f"--resume cannot finish an --dump-awq file: the layers done before the kill are not in it; "
                          f"rerun without --resume (the work in {work.path} is then discarded).")
    start_inputs = work.inputs() if start and ids is not None else None
    if start:
        print(f"resuming at layer {start} of {len(p.adapter.layers(fmodel))} from {work.path}", file=sys.stderr)
    _, report = run_pass(fmodel, p.adapter, p.steps, recipe, ids, on_layer=work.save_layer, start=start,
                         start_inputs=start_inputs, **run)
    manifest["report"] = {"seconds": round(report.seconds, 2), "layers": work.rows}
    # the work directory's checkpoint is completed in place and linked into the output, so the
    # finished layers are never copied; it stays whole for --resume until the output is renamed
    work.clear_finish()
    writer = CheckpointWriter(work.checkpoint, prefix="outer")
    for i in range(len(work.rows)):
        layer = work.layers[i]
        writer.add_file(layer["file"], layer["digests"], layer["in_features"])
    writer.add({}, outer_float_tensors(fmodel, p.adapter, source, chunked=True))
    writer.finish(fmodel.config, scheme, manifest, tokenizer, generation_config)
    del fmodel, source
    return_freed_memory()
    with atomic_dir(out, overwrite) as tmp:
        for f in recipe.formats:
            (tmp / f).mkdir()
            p.registries["exporters"].get(f)().write(
                _open_lowbit(work.checkpoint, tokenizer, generation_config, p.adapter), tmp / f)
        link_tree(work.checkpoint, tmp / "lowbit")
    work.remove()
    return _open_lowbit(out / "lowbit", tokenizer, generation_config, p.adapter)


def _files_identity(src: ModelSource) -> list:
    """Name, size and modification time of the model's weight files (a resume must see the same ones)."""
    path = Path(src.path)
    if not path.is_dir():
        return [src.path]
    files = [path / src.gguf_file] if src.gguf_file else sorted(path.glob("*.safetensors"))
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()]


def _open_lowbit(path: Path, tokenizer, generation_config, adapter: Adapter) -> QuantizedModel:
    """A lowbit checkpoint just written, read lazily (tensors on access) with its tokenizer and adapter."""
    qmodel = LowbitCheckpoint().read(path, lazy=True, verify=False)
    qmodel.tokenizer, qmodel.generation_config, qmodel.adapter = tokenizer, generation_config, adapter
    return qmodel


def outer_float_tensors(model: nn.Module, adapter: Adapter, source: WeightSource | None, chunked: bool = False
                        ) -> dict[str, torch.Tensor | TensorChunks]:
    """Float32 tensors outside the decoder layers (embeddings, final norm, an untied lm_head) from
    ``source`` or, without one, from ``model``; ``chunked``: as row chunks read when written."""
    inside = adapter.layers_path + "."
    out: dict[str, torch.Tensor | TensorChunks] = {}
    for name, t in model.state_dict().items():
        if name.startswith(inside):
            continue
        dtype = torch.float32 if t.is_floating_point() else t.dtype
        if source is not None and name in source:
            out[name] = source.chunked(name, dtype) if chunked else source[name].to(dtype)
        elif t.device.type != "meta":  # (a tied lm_head the source does not hold stays out)
            out[name] = t.detach().to(dtype, copy=True)
    for name in tied_output_weights(model):
        out.pop(name, None)
    return out


@exclusive_output
def export_compatible(model: str | None, out: str | Path, recipe: Recipe | None = None, *, overwrite: bool = False,
                      trust_remote_code: bool = False, progress: bool = True,
                      registries: Mapping[str, Registry] | None = None, **recipe_fields: Any) -> Path:
    """Run only the recipe's transform steps (AWQ scaling and clipping) and save the float model as
    a plain HF checkpoint with no quantization_config, for any other GPTQ tool."""
    recipe = recipe.replace(**recipe_fields) if recipe is not None else Recipe(**{"method": "awq", **recipe_fields})
    p = plan(model, recipe, out, overwrite, trust_remote_code, export_compatible=True, registries=registries)
    tokenizer = load_tokenizer(p.source, trust_remote_code)
    ids = calibration.samples(tokenizer, calibration.load_text(recipe.calib), recipe.nsamples, recipe.seqlen)
    fmodel, source = weights_of(p.source, p.config, trust_remote_code, p.adapter)
    with atomic_dir(out, overwrite) as tmp:
        if source is None:  # loaded whole (it fits): transformers writes it
            run_pass(fmodel, p.adapter, p.steps, recipe, ids, progress=progress)
            fmodel.save_pretrained(str(tmp), safe_serialization=True)
        else:  # streamed: each transformed layer is written as it is done, under the names it was read by
            writer = ShardWriter(tmp)

            def write_layer(_i: int, _q: dict, floats: dict, _inputs, _row) -> None:
                for name in sorted(floats):
                    writer.add(source.stored_name(name), floats[name])

            run_pass(fmodel, p.adapter, p.steps, recipe, ids, progress=progress, source=source, on_layer=write_layer)
            outer = outer_float_tensors(fmodel, p.adapter, source, chunked=True)
            for name in sorted(outer):
                writer.add(name, outer[name])
            writer.close()
            write_config(fmodel.config, tmp)
            generation_config = load_generation_config(p.source)
            if generation_config is not None:
                generation_config.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    return Path(out)


def _jsonable(opts: dict) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in opts.items()}
