"""Where one decode step's time goes: lowbit's model against bf16 transformers, per token, by part.

    python benchmarks/cpu/profile_decode.py out/demo-gptq-w4g64/lowbit              # 1 thread, CPU clock
    python benchmarks/cpu/profile_decode.py out/demo-gptq-w4g64/lowbit --lm-head int8 --threads 2 --clock wall

Prompt of ``--prompt-len`` random tokens, then ``--new-tokens`` greedy steps with the KV cache; each step
is split by forward hooks into: quantized/float linears of the decoder layers, lm_head, RMSNorms,
attention without its projections (rotary, cache update, SDPA, reshapes), the MLP's activation and
product, rotary tables, embedding, and the rest (decoder-layer glue, residual adds, cache bookkeeping,
mask creation, the hooks themselves). Medians over the steps, milliseconds per token.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from lowbit.exporting import read_checkpoint
from lowbit.run.bench import CLOCKS, machine
from lowbit.run.nn import QuantLinear, build_float_model, build_model


def _parts(model) -> dict[str, list]:
    """Part name → modules whose forward time is that part's (children are subtracted later)."""
    lin = (torch.nn.Linear, QuantLinear)
    parts: dict[str, list] = {"linears": [], "lm_head": [model.get_output_embeddings()], "norms": [],
                              "attention": [], "mlp": [], "rotary": [], "embedding": [model.get_input_embeddings()]}
    for name, mod in model.named_modules():
        cls = type(mod).__name__
        if isinstance(mod, lin) and name.startswith("model.layers."):
            parts["linears"].append(mod)
        elif cls.endswith("RMSNorm"):
            parts["norms"].append(mod)
        elif cls.endswith("Attention"):
            parts["attention"].append(mod)
        elif cls.endswith("MLP"):
            parts["mlp"].append(mod)
        elif cls.endswith("RotaryEmbedding"):
            parts["rotary"].append(mod)
    return parts


def profile(model, prompt_len: int, new_tokens: int, clock: str) -> dict:
    now = CLOCKS[clock]
    parts = _parts(model)
    acc = {k: 0.0 for k in parts}
    inner = {"attention": 0.0, "mlp": 0.0}  # linears inside attention/MLP, subtracted from them
    starts: dict[int, float] = {}
    handles = []

    def pre(mod, _args):
        starts[id(mod)] = now()

    def post_for(part, parent):
        def post(mod, _args, _out):
            dt = now() - starts.pop(id(mod))
            acc[part] += dt
            if parent:
                inner[parent] += dt
        return post

    attn_lin = {id(m) for a in parts["attention"] for m in a.modules() if m is not a}
    for part, mods in parts.items():
        for m in mods:
            parent = None
            if part == "linears":
                parent = "attention" if id(m) in attn_lin else "mlp"
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post_for(part, parent)))
    vocab = int(model.config.vocab_size)
    ids = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    steps = []
    with torch.inference_mode():
        model(ids[:, :8], use_cache=False)
        out = model(ids, use_cache=True, logits_to_keep=1)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            for k in acc:
                acc[k] = 0.0
            inner["attention"] = inner["mlp"] = 0.0
            t = now()
            out = model(tok, past_key_values=past, use_cache=True)
            total = now() - t
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            row = dict(acc)
            row["attention"] -= inner["attention"]
            row["mlp"] -= inner["mlp"]
            row["rest"] = total - sum(row.values())
            row["total"] = total
            steps.append(row)
    for h in handles:
        h.remove()
    return {k: statistics.median(s[k] for s in steps) * 1e3 for k in steps[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="cpu")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--lm-head", choices=("float", "int8", "int4"), default="float")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    qm = read_checkpoint(a.checkpoint)
    rows = {}
    label = "lowbit" + ("" if a.lm_head == "float" else f" (lm_head {a.lm_head})")
    rows[label] = profile(build_model(qm, "cpu", torch.bfloat16, lm_head=a.lm_head), a.prompt_len, a.new_tokens,
                          a.clock)
    rows["bf16 transformers"] = profile(build_float_model(qm, torch.bfloat16), a.prompt_len, a.new_tokens, a.clock)
    report = {"machine": machine(), "clock": a.clock, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
              "ms_per_token": rows}
    if a.json:
        print(json.dumps(report, indent=2))
        return
    m = report["machine"]
    cols = list(next(iter(rows.values())))
    print(f"decode step profile, ms/token (median of {a.new_tokens} steps after a {a.prompt_len}-token prompt, "
          f"{a.clock} clock)")
    print(f"machine: {m['cpu']} [{', '.join(m['isa'])}], {m['threads']} threads, torch {m['torch']}, "
          f"load average {', '.join(f'{x:.1f}' for x in m['load_average'] or [])}")
    print()
    print("| model | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r[c]:.2f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
