"""Quality benchmark: WikiText-2 test perplexity of RTN, AWQ, GPTQ, AWQ+GPTQ (and SignRound) on the demo model.

Each quantization runs in its own subprocess, so its wall time and peak RSS are its own. Rows are
appended to ``results.jsonl`` as they finish (a killed run keeps what it measured); ``--table``
rewrites RESULTS.md from that file.

    python benchmarks/quality/run.py                      # everything (hours on a 2-core box)
    python benchmarks/quality/run.py --schemes w4g64 --methods rtn,gptq --windows 10
    python benchmarks/quality/run.py --table              # RESULTS.md from results.jsonl
    python benchmarks/quality/run.py --schemes w4g64 --methods signround,awq+signround --signround-iters 20

When ``llmcompressor`` is importable, ``--llmcompressor`` adds its RTN, GPTQ and AWQ at W4 g64 on
the same model, calibration tokens and evaluation windows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.jsonl"
SCHEMES = {"w4g64": (4, 64), "w4g-1": (4, -1), "w3g64": (3, 64)}
METHODS = ["rtn", "awq", "gptq", "awq+gptq"]


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _perplexity(model, tokenizer, windows: int, seqlen: int) -> dict:
    from lowbit.run.evaluate import perplexity

    res = perplexity(model, tokenizer, seqlen=seqlen, max_windows=windows or None, progress=False, per_window=True)
    per = res.pop("window_nll")
    if len(per) > 8:  # full-set rows also say what the first 8 windows (the earlier rows' subset) give
        res["ppl_first8"] = math.exp(sum(per[:8]) / 8)
    return res


def one_lowbit(method: str, scheme_name: str, a) -> dict:
    """Quantize with lowbit and evaluate (runs in a child process)."""
    import torch

    from lowbit.pipeline import quantize
    from lowbit.run.nn import build_float_model
    from lowbit.scheme import QuantScheme

    torch.set_num_threads(a.threads)
    bits, gs = SCHEMES[scheme_name]
    scheme = QuantScheme(bits, gs)
    opts: dict = {"gptq": {"column_order": a.column_order}} if "gptq" in method else {}
    if "signround" in method:
        opts["signround"] = {"iters": a.signround_iters}
    if "awq" in method and a.awq_no_clip:
        opts.setdefault("awq", {})["clip"] = False
    awq_dump = HERE / "awq" / f"{scheme_name}.safetensors"
    if method == "awq" and a.dump_awq:
        awq_dump.parent.mkdir(exist_ok=True)
        opts["awq"] = {"dump": str(awq_dump)}
    if method == "awq+gptq" and a.reuse_awq and awq_dump.is_file():
        opts["awq"] = {"load": str(awq_dump)}
    search_tokens = None
    if "awq" in method:
        from lowbit.algorithms.awq import AWQ, read_results

        loaded = opts.get("awq", {}).get("load")
        search_tokens = (read_results(loaded)[1]["options"] if loaded else AWQ.defaults())["search_tokens"]
    if a.compute_dtype == "auto":  # what `lowbit quantize --compute-dtype auto` picks here; the row records it
        from lowbit.pipeline import fast_compute_dtype

        a.compute_dtype = "bf16" if fast_compute_dtype() == torch.bfloat16 else "fp32"
    compute = torch.float32 if a.compute_dtype == "fp32" else torch.bfloat16
    t0, c0 = time.perf_counter(), time.process_time()
    qm = quantize(None, method=method, scheme=scheme, nsamples=a.nsamples, seqlen=a.calib_seqlen,
                  step_options=opts, compute_dtype=compute, progress=a.progress)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rss = _peak_rss_mib()
    report = qm.manifest.get("report", {})
    layers = report.get("layers", [])
    errs = [r["output_rel_error"] for r in layers if "output_rel_error" in r]
    model = build_float_model(qm, torch.float32)  # dequantized weights: the reference kernel's numerics
    ppl = _perplexity(model, qm.tokenizer, a.windows, a.seqlen)
    return {
        "tool": "lowbit", "method": method, "column_order": a.column_order if "gptq" in method else None,
        "scheme": scheme_name, "ppl": ppl["ppl"], "ppl_first8": ppl.get("ppl_first8"), "windows": ppl["windows"],
        "eval_seqlen": ppl["seqlen"], "quant_wall_s": round(wall, 1), "quant_cpu_s": round(cpu, 1),
        "pass_s": report.get("seconds"),
        "peak_rss_mib": round(rss), "mean_layer_err": sum(errs) / len(errs) if errs else None,
        "last_layer_err": errs[-1] if errs else None, "awq_loaded": "load" in opts.get("awq", {}),
        "step_seconds": {k: round(sum(r.get(k, 0) for r in layers), 1)
                         for k in ("awq_seconds", "gptq_seconds", "signround_seconds")},
        "awq_search_tokens": search_tokens, "signround_iters": a.signround_iters if "signround" in method else None,
        "awq_clip": not a.awq_no_clip if "awq" in method else None,
    }


def one_fp32(a) -> dict:
    import torch

    from lowbit.loading import load_model, load_tokenizer, resolve

    torch.set_num_threads(a.threads)
    src = resolve(None)
    model = load_model(src, torch.float32)
    ppl = _perplexity(model, load_tokenizer(src), a.windows, a.seqlen)
    return {"tool": "fp32", "method": "fp32", "scheme": "-", "ppl": ppl["ppl"], "ppl_first8": ppl.get("ppl_first8"),
            "windows": ppl["windows"],
            "eval_seqlen": ppl["seqlen"], "peak_rss_mib": round(_peak_rss_mib())}


def _cpu_only_pinning_fix(torch) -> None:
    """llm-compressor 0.14's AWQ pins its cached activations (``pin_memory``, to speed host-to-GPU copies),
    which raises "Cannot access accelerator device when none is available" on a CPU-only PyTorch. Pinning
    changes no value, so where there is no accelerator it is skipped."""
    if torch.cuda.is_available():
        return
    try:
        from llmcompressor.pipelines.cache import IntermediatesCache
    except ImportError:
        return
    if hasattr(IntermediatesCache, "pin_memory"):
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None


def freeze_fake_quant(model) -> dict:
    """Write llm-compressor's fake-quantized weights into the float weights once and turn its per-forward
    quantization off: the same values (checked against its fake-quant row for RTN), ~3x faster to evaluate.
    Returns the frozen weights by name."""
    import torch
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    frozen = {}
    with torch.no_grad():
        for name, mod in model.named_modules():
            if getattr(mod, "quantization_scheme", None) is not None and hasattr(mod, "weight_scale"):
                mod.weight.copy_(fake_quantize(mod.weight, mod.weight_scale, mod.weight_zero_point,
                                               mod.quantization_scheme.weights))
                mod.quantization_enabled = False
                frozen[f"{name}.weight"] = mod.weight.detach()
    return frozen


def one_llmcompressor(method: str, a) -> dict:
    """llm-compressor's RTN / GPTQ / AWQ at W4 g64 asym on the same model, calibration and windows."""
    import torch
    from llmcompressor import oneshot
    try:
        from llmcompressor.modifiers.transform.awq import AWQModifier
    except ImportError:  # before 0.14
        from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    from lowbit import calibration
    from lowbit.loading import load_model, load_tokenizer, resolve

    _cpu_only_pinning_fix(torch)
    torch.set_num_threads(a.threads)
    src = resolve(None)
    tok = load_tokenizer(src)
    model = load_model(src, torch.float32)
    # llm-compressor re-reads the config from model.name_or_path, which a GGUF file is not: hand it
    # the same float weights as a plain HF checkpoint
    import tempfile

    from transformers import AutoModelForCausalLM

    tmp = tempfile.mkdtemp(prefix="lowbit-llmc-")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    del model
    model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    ids = calibration.samples(tok, calibration.load_text("wikitext2"), a.nsamples, a.calib_seqlen)
    from datasets import Dataset

    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    weights = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 64}
    if a.llmc_scale_dtype == "fp16":  # its scales rounded to fp16, as lowbit (and AutoAWQ's, GPTQ's formats) store them
        weights["scale_dtype"] = torch.float16
    scheme = {"config_groups": {"g0": {"targets": ["Linear"], "weights": weights}}}
    if method == "rtn":
        mods = [QuantizationModifier(ignore=["lm_head"], **scheme)]
    elif method == "gptq":
        mods = [GPTQModifier(ignore=["lm_head"], **scheme)]
    else:  # AWQ is a transform followed by quantization since llm-compressor 0.14
        mods = [AWQModifier(), QuantizationModifier(ignore=["lm_head"], **scheme)]
    t0 = time.perf_counter()
    oneshot(model=model, processor=tok, dataset=ds, recipe=mods, num_calibration_samples=a.nsamples,
            max_seq_length=a.calib_seqlen)
    wall = time.perf_counter() - t0
    rss = _peak_rss_mib()
    frozen = freeze_fake_quant(model)
    if a.save_llmcompressor:  # its quantized weights, to evaluate again without hours of calibration
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in frozen.items()},
                  f"{a.save_llmcompressor}/llmcompressor-{method}-w4g64.safetensors",
                  metadata={"quant_wall_s": f"{wall:.1f}", "peak_rss_mib": f"{rss:.0f}"})
    ppl = _perplexity(model.float(), tok, a.windows, a.seqlen)
    return {"tool": "llmcompressor", "method": method, "scheme": "w4g64", "ppl": ppl["ppl"],
            "ppl_first8": ppl.get("ppl_first8"),
            "windows": ppl["windows"], "eval_seqlen": ppl["seqlen"], "quant_wall_s": round(wall, 1),
            "peak_rss_mib": round(rss), "scale_dtype": "fp16" if a.llmc_scale_dtype == "fp16" else "fp32"}


def _cpu() -> str:
    """The CPU model and its matmul-relevant ISA (rows from different machines differ in time, not in PPL)."""
    from lowbit.run.bench import machine

    m = machine()
    return f"{m['cpu']} ({', '.join(m['isa']) or 'no avx2'})"


def _commit() -> str | None:
    """The lowbit commit the row was measured with (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True)
    except OSError:
        return None
    return out.stdout.strip() or None


def child(a) -> None:
    commit = _commit()  # the code the row runs, read before the (long) run
    kind, _, rest = a.one.partition(":")
    if kind == "fp32":
        row = one_fp32(a)
    elif kind == "llmcompressor":
        row = one_llmcompressor(rest, a)
    else:
        method, _, scheme = rest.partition("@")
        row = one_lowbit(method, scheme, a)
    row.update({"nsamples": a.nsamples, "calib_seqlen": a.calib_seqlen,
                "compute_dtype": "fp32" if kind == "llmcompressor" else a.compute_dtype,  # its model is fp32
                "threads": a.threads, "host": platform.node(), "cpus": os.cpu_count(), "cpu": _cpu(),
                "load_avg_end": round(os.getloadavg()[0], 1), "date": time.strftime("%Y-%m-%d %H:%M"),
                "commit": commit})
    with RESULTS.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def jobs(a) -> list[str]:
    out = [] if a.no_fp32 else ["fp32:"]
    for s in a.schemes.split(","):
        for m in filter(None, a.methods.split(",")):
            out.append(f"lowbit:{m}@{s}")
    if a.llmcompressor:
        try:
            import llmcompressor  # noqa: F401
        except ImportError:
            print("llmcompressor is not installed; skipping its rows", file=sys.stderr)
        else:
            out += [f"llmcompressor:{m}" for m in a.llmcompressor.split(",")]
    return out


def _fmt(x, spec):
    return "–" if x is None else format(x, spec)


def _machine(row: dict) -> str:
    """Short CPU label; rows from before the ``cpu`` field were all measured on the AMD EPYC (Zen 3, AVX2)."""
    cpu = row.get("cpu") or "AMD EPYC (avx2)"
    return ("Xeon" if "Xeon" in cpu else "EPYC" if "EPYC" in cpu or "AMD" in cpu else cpu.split(" (")[0]) + \
        (" AMX" if "amx_bf16" in cpu else " AVX-512" if "avx512f" in cpu else " AVX2" if "avx2" in cpu else "")


def table() -> str:
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    latest: dict = {}
    for r in rows:  # the newest row of each (tool, method, scheme, windows) wins
        label = r["method"] + (", fp16 scales" if r["tool"] == "llmcompressor" and r.get("scale_dtype") == "fp16" else "")
        if r.get("awq_clip") is False:
            label += ", AWQ scales only (no clip)"
        if r.get("signround_iters") is not None:
            label += f", iters {r['signround_iters']}"
        if r.get("note"):  # what set an older row apart from the code's current defaults
            label += f", {r['note']}"
        if r.get("compute_dtype") == "bf16" and r["method"] != "rtn":  # AMX rows: calibration matmuls in bf16
            label += ", bf16 matmuls"
        latest[(r["tool"], label, r["scheme"], r["windows"])] = r
    lines = ["| tool | method | scheme | PPL | windows × seqlen | PPL, first 8 windows | quant wall (s) | "
             "AWQ / GPTQ or signround step (s) | peak RSS (MiB) | mean layer err | load avg | commit | CPU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {m: i for i, m in enumerate(["fp32"] + METHODS + ["signround", "awq+signround"])}
    # full-set rows (most windows) first, then by scheme, tool and method
    for (tool, label, scheme, _), r in sorted(latest.items(), key=lambda kv: (-kv[0][3], kv[0][0] != "fp32", kv[0][2],
                                                                                kv[0][0], order.get(kv[0][1].split(",")[0], 9))):
        steps = r.get("step_seconds") or {}
        st = " / ".join(_fmt(steps.get(k) or None, ".0f") for k in ("awq_seconds", "gptq_seconds")) \
            if not steps.get("signround_seconds") else f"{_fmt(steps.get('awq_seconds') or None, '.0f')} / " \
            f"{steps['signround_seconds']:.0f}"
        method_s = label + (" (AWQ loaded)" if r.get("awq_loaded") else "")
        method = r["method"]
        if tool == "lowbit" and "awq" in method:  # rows before the field searched on 4096 tokens
            method_s += f", search {r.get('awq_search_tokens') or 4096}"
        if tool == "llmcompressor" and method == "gptq":  # its GPTQModifier default, = lowbit's hessian order
            method_s += ", actorder static"
        elif tool in ("gptqmodel", "autoround"):  # peers.py rows: the peer's defaults, its label says the rest
            method_s += ", its defaults" if "iters" not in method else ""
        elif "gptq" in method and "act-order" not in method:  # rows before the column_order field: natural order
            method_s += f", {r.get('column_order') or 'columns'} order"
        first8 = r.get("ppl_first8") or (r["ppl"] if r["windows"] == 8 else None)
        lines.append(f"| {tool} | {method_s} | {scheme} | {r['ppl']:.3f} | {r['windows']} × {r['eval_seqlen']} | "
                     f"{_fmt(first8, '.3f')} | {_fmt(r.get('quant_wall_s'), '.0f')} | {st} | "
                     f"{_fmt(r.get('peak_rss_mib'), '.0f')} | "
                     f"{_fmt(r.get('mean_layer_err'), '.4f')} | {_fmt(r.get('load_avg_end'), '.1f')} | "
                     f"{r.get('commit') or '–'} | {_machine(r)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schemes", default=",".join(SCHEMES), help="comma list of w4g64, w4g-1, w3g64")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--windows", type=int, default=40, help="evaluation windows (0: the full test set)")
    p.add_argument("--seqlen", type=int, default=2048, help="evaluation window length")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--compute-dtype", default="fp32", choices=["fp32", "bf16", "auto"],
                   help="calibration matmul dtype (lowbit's default: fp32); auto = bf16 where the CPU has AMX, else "
                        "fp32 (without AMX bf16 matmuls are slower than fp32: ~0.6x with AVX512-BF16, ~1/8 with AVX2)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--dump-awq", action="store_true", help="awq rows dump their search to benchmarks/quality/awq/")
    p.add_argument("--reuse-awq", action="store_true", help="awq+gptq rows load the awq row's dump (no second search)")
    p.add_argument("--no-fp32", action="store_true")
    p.add_argument("--column-order", default="hessian", choices=["hessian", "columns"],
                   help="GPTQ column order (lowbit's default hessian = llm-compressor's actorder=static)")
    p.add_argument("--llmcompressor", nargs="?", const="rtn,gptq,awq", default="",
                   help="also run llm-compressor's methods (comma list of rtn, gptq, awq; all when given bare), "
                        "when it is installed; --methods '' runs only these")
    p.add_argument("--llmc-scale-dtype", default="model", choices=["model", "fp16"],
                   help="llm-compressor's scale precision: the model's (fp32, its default) or fp16 (its scale_dtype), "
                        "the precision lowbit and the AutoAWQ / GPTQ formats store")
    p.add_argument("--save-llmcompressor", metavar="DIR", default="",
                   help="save llm-compressor's quantized (dequantized) weights to DIR before its evaluation")
    p.add_argument("--signround-iters", type=int, default=20,
                   help="signround's steps per layer (its default is 200; AutoRound's row here used 20)")
    p.add_argument("--awq-no-clip", action="store_true",
                   help="AWQ rows scale only, without the clipping search (with signround, which learns the ranges)")
    p.add_argument("--progress", action="store_true", help="show the quantization pass's progress bars")
    p.add_argument("--table", action="store_true", help="only rewrite RESULTS.md's table from results.jsonl")
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        child(a)
        return 0
    if not a.table:
        passthrough = [f"--windows={a.windows}", f"--seqlen={a.seqlen}", f"--nsamples={a.nsamples}",
                       f"--calib-seqlen={a.calib_seqlen}", f"--compute-dtype={a.compute_dtype}",
                       f"--threads={a.threads}", f"--column-order={a.column_order}",
                       f"--signround-iters={a.signround_iters}",
                       f"--save-llmcompressor={a.save_llmcompressor}", f"--llmc-scale-dtype={a.llmc_scale_dtype}"] + (["--dump-awq"] if a.dump_awq else []) + \
                      (["--reuse-awq"] if a.reuse_awq else []) + (["--progress"] if a.progress else []) + \
                      (["--awq-no-clip"] if a.awq_no_clip else [])
        for job in jobs(a):
            print(f"== {job}", flush=True)
            rc = subprocess.call([sys.executable, __file__, f"--one={job}", *passthrough])
            if rc:
                print(f"   {job} failed with exit status {rc}", file=sys.stderr)
    if RESULTS.is_file():
        t = table()
        md = HERE / "RESULTS.md"
        text = md.read_text() if md.is_file() else ""
        start, end = "<!-- table -->", "<!-- /table -->"
        if start in text and end in text:
            text = text[: text.index(start) + len(start)] + "\n" + t + "\n" + text[text.index(end):]
        else:
            text = text + f"\n{start}\n{t}\n{end}\n"
        md.write_text(text)
        print(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
