"""Model-level CPU benchmark: a checkpoint through lowbit's kernels against its bf16 transformers model.

    lowbit quantize --method rtn --bits 4 --group-size 64 --out out/demo-w4g64   # the demo model
    python benchmarks/cpu/bench_model.py out/demo-w4g64/lowbit
    python benchmarks/cpu/bench_model.py out/demo-w4g64/lowbit --threads 1 --clock cpu

Same as ``lowbit bench CKPT``; extra arguments go to it.
"""

import sys

from lowbit.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--prompt-len", "128", "--new-tokens", "32", "--repeat", "3", *sys.argv[1:]]))
