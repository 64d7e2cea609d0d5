"""xFasterTransformer's own runtime on an xFT directory, run by the xFT interpreter (xFT 2.0.0 on
torch 2.3): it imports neither lowbit nor transformers.

Usage: ``run_xft.py MODEL_DIR DTYPE REQUEST.json OUT.json``. REQUEST holds ``prompts`` (lists of
token ids) and ``new_tokens``; OUT holds, per prompt, xFT's logits at every prompt position and its
greedy continuation (``tokens``).
"""

import json
import sys

import torch
import xfastertransformer


def main(model_dir: str, dtype: str, request: str, out: str) -> None:
    with open(request) as f:
        req = json.load(f)
    results = []
    for ids in req["prompts"]:
        x = torch.tensor([ids], dtype=torch.int64)
        # a fresh model per prompt and per use: xFT keeps decoding state between calls
        model = xfastertransformer.AutoModel.from_pretrained(model_dir, dtype=dtype)
        gen = model.generate(x, max_length=len(ids) + req["new_tokens"], do_sample=False, num_beams=1)
        model = xfastertransformer.AutoModel.from_pretrained(model_dir, dtype=dtype)
        model.config(max_length=len(ids) + 1)
        model.input(x)
        logits = model(x)
        results.append({"tokens": gen[0, len(ids):].tolist(), "logits": logits[0].float().tolist()})
    with open(out, "w") as f:
        json.dump({"torch": torch.__version__, "results": results}, f)


if __name__ == "__main__":
    main(*sys.argv[1:5])
