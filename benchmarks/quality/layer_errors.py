"""Layer by layer: lowbit's quantized decoder layers against a peer's, on the demo model's first layers.

Quantizes the first ``--layers`` decoder layers of the demo model with a lowbit method (``run_pass`` on the
truncated float model, the calibration windows every quality row uses), loads a peer's dequantized weights
(``peers.py --quant`` writes them to ``peers_out/TOOL-SCHEME.safetensors``), and prints for each layer the mean
squared error of its output against the float model's own output of that layer, over all calibration samples:

- on its own quantized stream (the inputs its quantized layers before it produce: what the model will see);
- on the float model's inputs (the layer alone).

    python benchmarks/quality/layer_errors.py --peer peers_out/autoround-w3g64.safetensors --bits 3 \\
        --method signround --iters 20 --layers 3 [--compute-dtype bf16] [--select batch]

Matmuls of the comparison itself are fp32. It needs the peer's weights file, which is not in the repository.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peer", type=Path, required=True, help="a peer's dequantized weights (safetensors)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--method", default="signround")
    ap.add_argument("--iters", type=int, default=20, help="signround steps")
    ap.add_argument("--select", choices=("fixed", "batch"), default=None, help="signround's best-step rule")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--compute-dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lowbit import calibration
    from lowbit.loading import load_tokenizer, resolve, resolve_local
    from lowbit.pipeline import capture_layer_inputs, plan, run_pass
    from lowbit.recipe import Recipe
    from lowbit.scheme import QuantScheme

    opts = {"iters": a.iters, **({"select": a.select} if a.select else {})} if "signround" in a.method else {}
    recipe = Recipe(method=a.method, scheme=QuantScheme(a.bits, a.group_size), step_options={"signround": opts} if opts else {},
                    compute_dtype=torch.bfloat16 if a.compute_dtype == "bf16" else torch.float32)
    p = plan("demo", recipe, None)
    ids = calibration.samples(load_tokenizer(p.source), calibration.load_text(recipe.calib), recipe.nsamples,
                              recipe.seqlen)
    model = AutoModelForCausalLM.from_pretrained(resolve_local(resolve("demo")), dtype=torch.float32)
    model.model.layers = model.model.layers[:a.layers]
    model.config.num_hidden_layers = a.layers
    float_model = copy.deepcopy(model)
    qweights, _ = run_pass(model, p.adapter, p.steps, recipe, ids, progress=False)
    peer = load_file(str(a.peer))
    layers = p.adapter.layers(float_model)
    inputs, kwargs = capture_layer_inputs(float_model, p.adapter, ids, recipe.batch_size)

    @torch.no_grad()
    def run(layer, xs):
        outs = [layer(x, **kw) for x, kw in zip(xs, kwargs)]
        return [o[0] if isinstance(o, tuple) else o for o in outs]

    def mse(a_, b_):
        return float(sum((x - y).pow(2).sum() for x, y in zip(a_, b_)) / sum(y.numel() for y in b_))

    print(f"{a.method} W{a.bits} g{a.group_size}, {a.iters} steps, {a.compute_dtype}; peer {a.peer.name}")
    print("| layer | peer, own stream | lowbit, own stream | peer, float inputs | lowbit, float inputs |")
    print("|---:|---:|---:|---:|---:|")
    fp = peer_in = low_in = inputs
    for i, f in enumerate(layers):
        ref = run(f, fp)
        lp, ll = copy.deepcopy(f), copy.deepcopy(f)
        for name, mod in lp.named_modules():
            if isinstance(mod, torch.nn.Linear):
                path = f"{p.adapter.layer_prefix(i)}{name}"
                mod.weight.data = peer[path + ".weight"].float()
                ll.get_submodule(name).weight.data = qweights[path].dequantize().float()
        op, ol = run(lp, peer_in), run(ll, low_in)
        print(f"| {i} | {mse(op, ref):.4g} | {mse(ol, ref):.4g} | {mse(run(lp, fp), ref):.4g} | "
              f"{mse(run(ll, fp), ref):.4g} |", flush=True)
        fp, peer_in, low_in = ref, op, ol
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
