"""Where a decode step of the native decoder goes: milliseconds per op per token.

    python benchmarks/cpu/profile_native.py out/demo-gptq-w4g64/lowbit --lm-head int8 --threads 1

The decoder's own timers (csrc/engine.c, PROF_*): thread 0 reads the wall clock after each op's barrier, so an
op's time includes waiting for the slowest thread (and, on a shared machine, for a descheduled one). Mean over
``--steps`` greedy steps after a ``--prompt-len`` random prompt, median of ``--repeat`` such means. Also prints
the bytes of weights each token streams and the resulting GB/s, next to a measured read bandwidth.
"""

import argparse
import json
import os
import statistics

import torch

from lowbit.exporting import read_checkpoint
from lowbit.run.bench import read_bandwidth_gbs
from lowbit_cpu.engine import PROFILE_OPS, NativeDecoder


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--lm-head", default="float", choices=("float", "int8", "int4"))
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    dec = NativeDecoder(read_checkpoint(a.checkpoint), dtype, a.lm_head, capacity=a.prompt_len + a.steps + 1,
                        consume=True)
    runs = [dec.profile(a.prompt_len, a.steps, a.threads) for _ in range(a.repeat)]
    ms = {op: statistics.median(r[op] for r in runs) for op in PROFILE_OPS}
    total = sum(ms.values())
    streamed = dec.streamed_bytes()
    res = {"checkpoint": a.checkpoint, "lm_head": a.lm_head, "threads": a.threads, "ms_per_token": ms,
           "total_ms": total, "weights_streamed_bytes": streamed, "streamed_gbs": streamed / total / 1e6,
           "read_bandwidth_gbs": read_bandwidth_gbs(), "load_average": os.getloadavg()}
    if a.json:
        print(json.dumps(res, indent=1))
        return 0
    print(f"{dec.describe()}, {a.threads} thread(s), load average {', '.join(f'{x:.1f}' for x in res['load_average'])}")
    print("| " + " | ".join(PROFILE_OPS) + " | total |")
    print("|" + "---:|" * (len(PROFILE_OPS) + 1))
    print("| " + " | ".join(f"{ms[op]:.2f}" for op in PROFILE_OPS) + f" | {total:.2f} |")
    print(f"weights streamed per token ~{streamed / 2**20:.0f} MiB -> {res['streamed_gbs']:.1f} GB/s "
          f"(measured read bandwidth {res['read_bandwidth_gbs']:.1f} GB/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
