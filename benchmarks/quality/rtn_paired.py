"""Paired per-window comparison of lowbit's RTN and llm-compressor's RTN (W4 g64 asym) on the demo model.

Both quantized models are evaluated as plain float models (dequantized weights) by lowbit's perplexity over
the full WikiText-2 test set; the per-window NLL differences give the mean difference, its standard error
and t, which say whether a perplexity gap is systematic or noise. Needs llmcompressor (see run.py) and
~30 minutes on 2 cores. Writes ``rtn_paired.json`` (per-window NLLs) next to this file.

    python benchmarks/quality/rtn_paired.py [--windows N]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def paired(a: list[float], b: list[float]) -> dict:
    """Mean of ``a - b`` per window, its standard error and t, and in how many windows ``a`` is lower."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    n = len(d)
    mean = sum(d) / n
    se = (sum((x - mean) ** 2 for x in d) / (n - 1)) ** 0.5 / n**0.5
    return {"windows": n, "mean_nll_diff": mean, "se": se, "t": mean / se if se else float("inf"),
            "a_lower_windows": sum(x < 0 for x in d)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=0, help="evaluation windows (0: the full test set)")
    p.add_argument("--scale-dtype", default="fp32", choices=["fp32", "fp16"],
                   help="llm-compressor's scale precision (fp16: its scale_dtype, what lowbit stores); "
                        "fp16 writes rtn_paired_fp16.json")
    p.add_argument("--lowbit-from", metavar="JSON",
                   help="take lowbit's per-window NLLs from an earlier result (same code and windows) instead of evaluating again")
    a = p.parse_args()

    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from run import freeze_fake_quant  # this folder's benchmark script

    from lowbit.loading import load_model, load_tokenizer, resolve
    from lowbit.pipeline import quantize
    from lowbit.run.evaluate import perplexity
    from lowbit.run.nn import build_float_model
    from lowbit.scheme import QuantScheme

    src = resolve(None)
    tok = load_tokenizer(src)
    nll = {}

    def evaluate(name, model):
        t = time.perf_counter()
        r = perplexity(model, tok, seqlen=2048, max_windows=a.windows or None, progress=False, per_window=True)
        nll[name] = r["window_nll"]
        print(f"{name}: PPL {r['ppl']:.4f} ({time.perf_counter() - t:.0f} s)", flush=True)

    if a.lowbit_from:
        nll["lowbit"] = json.loads(Path(a.lowbit_from).read_text())["window_nll"]["lowbit"]
    else:
        qm = quantize(None, method="rtn", scheme=QuantScheme(4, 64), progress=False)
        evaluate("lowbit", build_float_model(qm, torch.float32))
        del qm
    model = load_model(src, torch.float32)
    weights = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 64}
    if a.scale_dtype == "fp16":
        weights["scale_dtype"] = torch.float16
    scheme = {"config_groups": {"g0": {"targets": ["Linear"], "weights": weights}}}
    oneshot(model=model, recipe=[QuantizationModifier(ignore=["lm_head"], **scheme)])
    freeze_fake_quant(model)  # its fake-quantized weights, once, instead of on every forward
    evaluate("llmcompressor", model)
    res = paired(nll["lowbit"], nll["llmcompressor"])
    res.update({"ppl_lowbit": math.exp(sum(nll["lowbit"]) / len(nll["lowbit"])),
                "ppl_llmcompressor": math.exp(sum(nll["llmcompressor"]) / len(nll["llmcompressor"]))})
    print(json.dumps(res))
    out = "rtn_paired.json" if a.scale_dtype == "fp32" else f"rtn_paired_{a.scale_dtype}.json"
    (HERE / out).write_text(json.dumps({"summary": res, "window_nll": nll}))


if __name__ == "__main__":
    main()
