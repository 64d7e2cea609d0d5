"""Kernel-level CPU benchmark: every kernel that can run here against bf16 and fp32 nn.Linear.

Same as ``lowbit bench --kernels``; this script only fixes the configurations RESULTS.md shows:

    python benchmarks/cpu/bench_kernels.py                 # wall clock, torch's threads
    python benchmarks/cpu/bench_kernels.py --threads 1 --clock cpu
    python benchmarks/cpu/bench_kernels.py --json > out.json

Extra arguments go to ``lowbit bench`` (see ``lowbit bench --help``).
"""

import sys

from lowbit.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--kernels", "--repeat", "9", *sys.argv[1:]]))
