"""lowbit against llama.cpp and bf16 transformers on the demo model, side by side, in one run.

    python benchmarks/cpu/bench_llamacpp.py                           # 1 thread, CPU clock (RESULTS.md)
    python benchmarks/cpu/bench_llamacpp.py --threads 2 --clock wall  # all cores, wall clock

Rows, each measured in its own child process (so peak RSS is its own) at the same thread count:
lowbit W4 g64 GPTQ (a checkpoint of the demo model, made with ``lowbit quantize --method gptq`` into
``--out`` when it is not there yet) with the float lm_head, and with the lm_head quantized at load
time to int8 and int4; the same weights dequantized to bf16 and run by plain transformers; llama.cpp
(llama-cpp-python, a benchmark-only dependency pulled in by ``lowbit[demo]``) on the demo model's own
GGUF file (Q4_1, output layer Q8_0). Prompt 128 random tokens, 64 greedy decode steps, batch 1, median
of 3 runs; perplexity on the same 4 WikiText-2 test windows of 512 tokens for every row (llama.cpp's
from its own logits). This is ``lowbit bench`` with these options; extra arguments go to it.
"""

import argparse
import subprocess
import sys
from pathlib import Path

from lowbit.cli import main

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/demo-gptq-w4g64", help="where the GPTQ W4 g64 checkpoint is (or goes)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="cpu")
    a, rest = ap.parse_known_args()
    ckpt = Path(a.out) / "lowbit"
    if not ckpt.exists():
        subprocess.run([sys.executable, "-m", "lowbit.cli", "quantize", "--method", "gptq", "--bits", "4",
                        "--group-size", "64", "--out", a.out], check=True)
    sys.exit(main(["bench", str(ckpt), "--llama-cpp", "demo", "--prompt-len", "128", "--new-tokens", "64",
                   "--repeat", "3", "--ppl-windows", "4", "--ppl-seqlen", "512", "--lm-head", "float",
                   "--lm-head", "int8", "--lm-head", "int4", "--threads", str(a.threads), "--clock", a.clock,
                   *rest]))
