"""Where a decode step (or, with ``--prefill``, a prompt) of the native decoder goes: milliseconds per op.

    python benchmarks/cpu/profile_native.py out/demo-gptq-w4g64/lowbit --lm-head int8 --threads 1
    python benchmarks/cpu/profile_native.py out/demo-gptq-w4g64/lowbit --prefill --prompt-len 1024 [--gemm rows]

With ``--prefill`` the rows are milliseconds per prompt of ``--prompt-len`` random tokens (run in the decoder's
chunks, last logits only), and the prompt's process CPU time gives prefill tokens per second; ``--gemm rows``
keeps the int8 prompt matrices on the row kernels (VPDPBUSD) where the AMX tiles would run them.

The decoder's own timers (csrc/engine.c, PROF_*): thread 0 reads the wall clock after each op's barrier, so an
op's time includes waiting for the slowest thread (and, on a shared machine, for a descheduled one). Mean over
``--steps`` greedy steps after a ``--prompt-len`` random prompt, median of ``--repeat`` such means. Also prints
the bytes of weights each token streams and the resulting GB/s, next to a measured read bandwidth.
"""

import argparse
import ctypes
import json
import os
import statistics
import time

import torch

from lowbit.exporting import read_checkpoint
from lowbit.run.bench import read_bandwidth_gbs
from lowbit_cpu.engine import GEMM_ROWS, PROFILE_OPS, NativeDecoder


def profile_prefill(dec: NativeDecoder, prompt_len: int, threads: int) -> tuple[dict[str, float], float]:
    """(ms per op for one prompt, process CPU seconds of that prompt)."""
    dec.reset(max(dec.capacity, prompt_len))
    ids = torch.randint(0, dec.md.vocab, (prompt_len,), generator=torch.Generator().manual_seed(0))
    acc = (ctypes.c_double * len(PROFILE_OPS))()
    dec.md.prof = ctypes.cast(acc, ctypes.c_void_p).value
    try:
        t0 = time.process_time()
        dec.forward(ids, threads=threads)
        cpu = time.process_time() - t0
    finally:
        dec.md.prof = None
    return {op: acc[i] * 1e3 for i, op in enumerate(PROFILE_OPS)}, cpu


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
    ap.add_argument("--prefill", action="store_true", help="profile a --prompt-len prompt instead of decode steps")
    ap.add_argument("--gemm", choices=("auto", "rows"), default="auto",
                    help="rows: int8 prompt matrices on the row kernels even where AMX runs")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    dec = NativeDecoder(read_checkpoint(a.checkpoint), dtype, a.lm_head, capacity=a.prompt_len + a.steps + 1,
                        consume=True)
    if a.gemm == "rows":
        dec.md.gemm = GEMM_ROWS
    if a.prefill:
        dec.forward(torch.zeros(min(a.prompt_len, 64), dtype=torch.int64), threads=a.threads)  # warm-up
        pre = [profile_prefill(dec, a.prompt_len, a.threads) for _ in range(a.repeat)]
        ms = {op: statistics.median(r[0][op] for r in pre) for op in PROFILE_OPS}
        cpu = statistics.median(r[1] for r in pre)
        res = {"checkpoint": a.checkpoint, "decoder": dec.describe(), "threads": a.threads,
               "prompt_len": a.prompt_len, "ms_per_prompt": ms, "total_ms": sum(ms.values()), "cpu_s": cpu,
               "prefill_tok_s_cpu": a.prompt_len / cpu, "load_average": os.getloadavg()}
        if a.json:
            print(json.dumps(res, indent=1))
            return 0
        print(f"{dec.describe()}, {a.threads} thread(s), prompt {a.prompt_len}, load average "
              f"{', '.join(f'{x:.1f}' for x in res['load_average'])}; ms per prompt (wall, thread 0)")
        print("| " + " | ".join(PROFILE_OPS) + " | total | CPU s | tok/s (CPU) |")
        print("|" + "---:|" * (len(PROFILE_OPS) + 3))
        print("| " + " | ".join(f"{ms[op]:.1f}" for op in PROFILE_OPS) + f" | {res['total_ms']:.1f} | {cpu:.3f} | "
              f"{res['prefill_tok_s_cpu']:.0f} |")
        return 0
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
