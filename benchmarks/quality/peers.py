"""Peers in the quality table: AutoRound and GPTQModel's GPTQ on the demo model, scored like lowbit's rows.

Same model (the demo model's cached float32 HF directory, ``lowbit.loading.resolve_local``), the same
calibration token windows as lowbit's rows (``lowbit.calibration.samples``: 128 × 512 tokens of the
built-in WikiText-2 validation text), and the same perplexity (``lowbit.run.evaluate.perplexity``: the
shared protocol, non-overlapping 2048-token windows of the test split, fp32 activations) on the float
model with the peer's quantized weights dequantized into it.

Two phases, each in its own process:

* ``--quant TOOL:SCHEME`` quantizes (wall time and peak RSS of that process are the row's), and writes
  the dequantized weights of every quantized linear to ``benchmarks/quality/peers_out/TOOL-SCHEME.safetensors``
  with the run's facts in its metadata;
* ``--eval TOOL:SCHEME`` loads the float model, replaces those weights, evaluates, and appends the row to
  ``results.jsonl`` (``run.py --table`` renders it like the other rows).

    python benchmarks/quality/peers.py --quant gptqmodel:w4g64 && python benchmarks/quality/peers.py --eval gptqmodel:w4g64
    python benchmarks/quality/peers.py --all            # both phases for every tool and scheme, sequentially

``--eval TOOL:SCHEME --resume`` continues a cut evaluation after the windows its progress file holds (the same
weights file: its per-weight errors must match). ``--row-from-progress TOOL:SCHEME --windows 8`` appends the row of an evaluation that was stopped, from the
windows it finished (8: the subset every lowbit row also reports); ``--decode gptqmodel:SCHEME=DIR --facts JSON``
decodes a GPTQModel checkpoint already saved.

The peers run in their own environment (see RESULTS.md, "Peers"): ``auto-round`` and ``gptqmodel`` pull
dependencies that lowbit's environment does not need, and lowbit's GPTQ reader needs ``lowbit-exporters``
(``-e packages/exporters``); gptqmodel wants ``GPTQMODEL_CPU_WORKERS=2`` on a 2-core machine. Schemes are asymmetric, group 64, as lowbit's rows;
every other setting is the peer's default except where ``--iters`` (AutoRound) says otherwise, which the
row then records.
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
OUT = HERE / "peers_out"
RESULTS = HERE / "results.jsonl"
SCHEMES = {"w4g64": (4, 64), "w3g64": (3, 64)}
TOOLS = ("gptqmodel", "autoround")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _setup(a) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    torch.set_num_threads(a.threads)


def _source():
    """The demo model's float32 HF directory (the cache lowbit converts its GGUF file into), and its tokenizer."""
    from lowbit.loading import load_tokenizer, resolve, resolve_local

    src = resolve(None)
    path = resolve_local(src)
    if path is None:
        raise SystemExit("the demo model has no local float directory (is LOWBIT_CACHE off?)")
    return src, Path(path), load_tokenizer(src)


def _calibration(tok, a):
    """lowbit's calibration token ids: ``[nsamples, calib_seqlen]`` windows of the WikiText-2 validation text."""
    from lowbit import calibration

    return calibration.samples(tok, calibration.load_text("wikitext2"), a.nsamples, a.calib_seqlen)


def quant_gptqmodel(scheme: str, a) -> tuple[dict, dict]:
    """GPTQModel's GPTQ, its QuantizeConfig defaults except bits, group size and sym=False; the quantized
    checkpoint is read back by lowbit's GPTQ reader (an independent decoder) and dequantized to fp32."""
    import tempfile

    import torch
    from gptqmodel import GPTQModel, QuantizeConfig

    bits, gs = SCHEMES[scheme]
    _, path, tok = _source()
    ids = _calibration(tok, a)
    calib = [{"input_ids": r.tolist(), "attention_mask": [1] * r.numel()} for r in ids]
    cfg = QuantizeConfig(bits=bits, group_size=gs, sym=False)
    t0 = time.perf_counter()
    model = GPTQModel.load(str(path), cfg, device="cpu", dtype=torch.float32)
    model.quantize(calib)
    out = tempfile.mkdtemp(prefix=f"peers-gptqmodel-{scheme}-")
    model.save(out)
    wall = time.perf_counter() - t0
    rss = _peak_rss_mib()
    weights = decode_gptq(out)
    settings = {k: v for k, v in _plain(cfg).items()}
    import gptqmodel

    return weights, {"quant_wall_s": round(wall, 1), "peak_rss_mib": round(rss), "version": gptqmodel.__version__,
                     "settings": settings, "checkpoint": out}


def decode_gptq(path) -> dict:
    """A GPTQ checkpoint's weights dequantized to fp32 by lowbit's GPTQ reader (needs lowbit-exporters)."""
    import torch

    from lowbit.exporting import read_checkpoint

    qm = read_checkpoint(path)
    return {f"{p}.weight": qw.dequantize(torch.float32).contiguous() for p, qw in qm.qweights.items()}


def decode_only(job: str, a) -> None:
    """``--decode gptqmodel:SCHEME=DIR``: write the evaluation input from a GPTQModel checkpoint already saved
    (a run whose decode step failed), with the quantization's facts given as JSON in ``--facts``."""
    from safetensors.torch import save_file

    spec, _, path = job.partition("=")
    weights = decode_gptq(path)
    facts = json.loads(a.facts)
    facts.setdefault("n_weights", len(weights))
    OUT.mkdir(exist_ok=True)
    save_file(weights, str(OUT / f"{spec.replace(':', '-')}.safetensors"), metadata={"facts": json.dumps(facts)})
    print(json.dumps(facts), flush=True)


def quant_autoround(scheme: str, a) -> tuple[dict, dict]:
    """AutoRound (sign-gradient rounding), its defaults except bits, group size, sym=False, the calibration
    windows (lowbit's, fed as a DataLoader of [batch, 512] id tensors) and, when given, ``--iters``."""
    import torch
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM

    bits, gs = SCHEMES[scheme]
    _, path, tok = _source()
    ids = _calibration(tok, a)
    kw = {}
    if a.iters is not None:
        kw["iters"] = a.iters
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    ar = AutoRound(model, tok, bits=bits, group_size=gs, sym=False, dataset=_loader(ids, a.ar_batch),
                   nsamples=a.nsamples, seqlen=a.calib_seqlen, device_map="cpu", **kw)
    ar.quantize()
    wall = time.perf_counter() - t0
    rss = _peak_rss_mib()
    weights = {}
    for name, mod in ar.model.named_modules():
        if isinstance(mod, torch.nn.Linear) and hasattr(mod, "scale"):  # quantized: weight holds its q-dq values
            weights[f"{name}.weight"] = mod.weight.detach().float().contiguous()
    import auto_round

    settings = {k: _jsonable(getattr(ar, k, None)) for k in
                ("bits", "group_size", "sym", "iters", "lr", "minmax_lr", "nsamples", "seqlen", "batch_size",
                 "gradient_accumulate_steps", "enable_minmax_tuning", "enable_quanted_input", "amp", "amp_dtype",
                 "scale_dtype", "data_type", "nblocks", "low_gpu_mem_usage", "enable_norm_bias_tuning",
                 "enable_alg_ext", "disable_opt_rtn")}
    # the calibration windows come as a DataLoader: its sizes are these (AutoRound's batch_size default is 8)
    settings.update({"nsamples": int(ids.shape[0]), "seqlen": int(ids.shape[1]), "batch_size": a.ar_batch})
    return weights, {"quant_wall_s": round(wall, 1), "peak_rss_mib": round(rss), "version": auto_round.__version__,
                     "settings": settings}


def _loader(ids, batch: int):
    import torch

    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in ids]
    return torch.utils.data.DataLoader(rows, batch_size=batch, shuffle=False)


def _jsonable(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def _plain(cfg) -> dict:
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else vars(cfg)
    return {k: _jsonable(v) for k, v in d.items()}


def do_quant(job: str, a) -> None:
    tool, _, scheme = job.partition(":")
    _setup(a)
    from safetensors.torch import save_file

    weights, facts = (quant_gptqmodel if tool == "gptqmodel" else quant_autoround)(scheme, a)
    ru = resource.getrusage(resource.RUSAGE_SELF)  # CPU seconds: on a shared machine wall time says little alone
    facts.update({"quant_cpu_s": round(ru.ru_utime + ru.ru_stime, 1), "load_avg_end": round(os.getloadavg()[0], 1), "date": time.strftime("%Y-%m-%d %H:%M"),
                  "n_weights": len(weights), "iters_arg": a.iters})
    OUT.mkdir(exist_ok=True)
    save_file(weights, str(OUT / f"{tool}-{scheme}.safetensors"), metadata={"facts": json.dumps(facts)})
    print(json.dumps(facts), flush=True)


def do_eval(job: str, a) -> None:
    tool, _, scheme = job.partition(":")
    _setup(a)
    import torch
    from safetensors import safe_open

    from lowbit.loading import load_model
    from lowbit.run.evaluate import eval_text, perplexity, window_ids

    f = OUT / f"{tool}-{scheme}.safetensors"
    with safe_open(str(f), "pt") as st:
        facts = json.loads(st.metadata()["facts"])
        weights = {k: st.get_tensor(k) for k in st.keys()}
    src, _, tok = _source()
    model = load_model(src, torch.float32)
    state = model.state_dict()
    missing = [k for k in weights if k not in state]
    if missing:
        raise SystemExit(f"{len(missing)} quantized weights not in the float model, e.g. {missing[:3]}")
    n_linear = sum(1 for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head")
    if len(weights) != n_linear:
        raise SystemExit(f"{len(weights)} quantized weights for {n_linear} linears")
    rel = []  # a decode check: each quantized weight's relative error against the float weight it replaces
    with torch.no_grad():
        for k, w in weights.items():
            rel.append(float((w - state[k]).norm() / state[k].norm()))
            state[k].copy_(w)
    print(f"{len(rel)} weights replaced; relative weight error mean {sum(rel) / len(rel):.4f}, max {max(rel):.4f}",
          flush=True)
    # lowbit's perplexity over the protocol's windows, 8 at a time: the same sums (every window has the same
    # token count), and the windows done so far are kept in TOOL-SCHEME.progress.json, so a run cut short
    # still says what its first windows gave
    wins = window_ids(tok, eval_text(), a.seqlen)
    if a.windows:
        wins = wins[: a.windows]
    per, t0, progress = [], time.perf_counter(), OUT / f"{tool}-{scheme}.progress.json"
    done_s = 0.0
    if a.resume and progress.exists():  # a cut run of the same weights file: keep the windows it scored
        prog = json.loads(progress.read_text())
        if prog["of"] != int(wins.shape[0]) or prog["weight_rel_err"] != rel or prog["windows"] % 8:
            raise SystemExit(f"{progress} is not a cut run of these weights and windows; run without --resume")
        per, done_s = list(prog["window_nll"]), prog["seconds"]
        print(f"resuming after {len(per)} windows ({done_s} s)", flush=True)
    for i in range(len(per), wins.shape[0], 8):
        per += perplexity(model, windows=wins[i : i + 8], seqlen=a.seqlen, progress=False, per_window=True)["window_nll"]
        progress.write_text(json.dumps({"windows": len(per), "of": int(wins.shape[0]),
                                        "ppl_so_far": math.exp(sum(per) / len(per)),
                                        "ppl_first8": math.exp(sum(per[:8]) / len(per[:8])), "window_nll": per,
                                        "weight_rel_err": rel,
                                        "seconds": round(done_s + time.perf_counter() - t0, 1)}))
    _append_row(tool, scheme, facts, per, rel, done_s + time.perf_counter() - t0, a)


def _append_row(tool: str, scheme: str, facts: dict, per: list, rel: list, seconds: float, a) -> None:
    """The results.jsonl row of the windows in ``per`` (all of the test set, or the first ones of a cut run)."""
    from run import _commit, _cpu  # noqa: E402  (benchmarks/quality/run.py, same directory)

    settings = facts.get("settings", {})
    if tool == "autoround" and settings.get("nsamples") is None:  # fed as a DataLoader of lowbit's windows
        settings.update({"nsamples": a.nsamples, "seqlen": a.calib_seqlen, "batch_size": a.ar_batch})
    iters = settings.get("iters")
    method = "gptq" if tool == "gptqmodel" else "autoround"
    if tool == "autoround" and facts.get("iters_arg") is not None:
        method += f", iters {iters} (not the default)"
    row = {"tool": tool, "method": method, "scheme": scheme, "ppl": math.exp(sum(per) / len(per)),
           "ppl_first8": math.exp(sum(per[:8]) / 8) if len(per) > 8 else None, "windows": len(per),
           "eval_seqlen": a.seqlen, "quant_wall_s": facts["quant_wall_s"], "quant_cpu_s": facts.get("quant_cpu_s"), "peak_rss_mib": facts["peak_rss_mib"],
           "version": facts["version"], "settings": settings, "eval_s": round(seconds, 1),
           "weight_rel_err_mean": sum(rel) / len(rel) if rel else None,
           "nsamples": a.nsamples, "calib_seqlen": a.calib_seqlen, "compute_dtype": "fp32", "threads": a.threads,
           "host": platform.node(), "cpus": os.cpu_count(), "cpu": _cpu(),
           "load_avg_end": facts["load_avg_end"], "load_avg_eval_end": round(os.getloadavg()[0], 1),
           "date": facts["date"], "commit": _commit()}
    with RESULTS.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def row_from_progress(job: str, a) -> None:
    """Append the row of an evaluation that was cut short: the windows its progress file holds."""
    from safetensors import safe_open

    tool, _, scheme = job.partition(":")
    with safe_open(str(OUT / f"{tool}-{scheme}.safetensors"), "pt") as st:
        facts = json.loads(st.metadata()["facts"])
    prog = json.loads((OUT / f"{tool}-{scheme}.progress.json").read_text())
    per = prog["window_nll"][: a.windows or None]  # --windows N: only the first N (8: the earlier rows' subset)
    _append_row(tool, scheme, facts, per, prog.get("weight_rel_err", []), prog["seconds"] * len(per) / len(prog["window_nll"]), a)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quant", metavar="TOOL:SCHEME", help="quantize (tools: gptqmodel, autoround; schemes: w4g64, w3g64)")
    p.add_argument("--eval", metavar="TOOL:SCHEME", help="evaluate a --quant output and append its row")
    p.add_argument("--decode", metavar="TOOL:SCHEME=DIR", help="decode a saved GPTQModel checkpoint (see --facts)")
    p.add_argument("--facts", default="{}", help="JSON facts of the quantization run, for --decode")
    p.add_argument("--row-from-progress", metavar="TOOL:SCHEME",
                   help="append the row of a cut --eval: the first windows its progress file holds")
    p.add_argument("--all", action="store_true", help="--quant then --eval for every tool and scheme, each in a child")
    p.add_argument("--windows", type=int, default=0, help="evaluation windows (0: the full test set, the protocol)")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--iters", type=int, default=None, help="AutoRound iterations (default: its own, 200)")
    p.add_argument("--ar-batch", type=int, default=8, help="AutoRound calibration batch (its default batch_size is 8)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--resume", action="store_true",
                   help="--eval: keep the windows a cut run of the same weights left in its progress file")
    a = p.parse_args(argv)
    sys.path.insert(0, str(HERE))
    if a.quant:
        do_quant(a.quant, a)
    elif a.eval:
        do_eval(a.eval, a)
    elif a.decode:
        _setup(a)
        decode_only(a.decode, a)
    elif a.row_from_progress:
        row_from_progress(a.row_from_progress, a)
    elif a.all:
        common = [f"--windows={a.windows}", f"--seqlen={a.seqlen}", f"--nsamples={a.nsamples}",
                  f"--calib-seqlen={a.calib_seqlen}", f"--threads={a.threads}", f"--ar-batch={a.ar_batch}"] + \
                 ([f"--iters={a.iters}"] if a.iters is not None else [])
        for tool in TOOLS:
            for scheme in SCHEMES:
                for phase in ("--quant", "--eval"):
                    rc = subprocess.call([sys.executable, __file__, f"{phase}={tool}:{scheme}", *common])
                    if rc:
                        print(f"{phase} {tool}:{scheme} failed with exit status {rc}", file=sys.stderr)
                        break
    else:
        p.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
