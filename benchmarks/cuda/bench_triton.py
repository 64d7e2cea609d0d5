"""Triton W4A16 (lowbit-backend-cuda) against cuBLAS fp16 ``torch.matmul``, L2 flushed between runs.

    python benchmarks/cuda/bench_triton.py                    # the issue's table (needs a CUDA GPU)
    python benchmarks/cuda/bench_triton.py --out results.md   # also write the table to a file
    python benchmarks/cuda/bench_triton.py --tune             # search launch configs, print a configs.py entry

Shapes are ``K x N`` (input features x output features, the weight of ``nn.Linear(K, N)``):
4096x4096 and 8192x8192 square projections, 4096x14336 an MLP up/gate projection, 14336x4096 its
down projection. Each timed run is preceded by writing a 256 MiB buffer (larger than any current
GPU's L2), so both sides read their weights from HBM as in a real forward pass; timings are CUDA
events around the op alone, reported as medians. The W4 side is the whole launcher (split-K
workspace zeroing and the final cast included) with the per-GPU configs of ``lowbit_cuda.configs``.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import sys

import torch

SHAPES = [(4096, 4096), (8192, 8192), (4096, 14336), (14336, 4096)]
BATCHES = [1, 16, 128]
GOALS = {(8192, 8192, 1): 2.5, (8192, 8192, 16): 2.0, (8192, 8192, 128): 0.9}  # H100, issue 6
FLUSH_BYTES = 256 * 1024 * 1024


def fail(msg: str) -> None:
    print(f"bench_triton: {msg}", file=sys.stderr)
    raise SystemExit(2)


def require_gpu() -> None:
    try:
        from lowbit_cuda.kernel import TritonW4A16Kernel
    except ImportError as err:
        fail(f"lowbit-backend-cuda is not importable ({err}); pip install -e packages/core -e packages/backend-cuda")
    reason = TritonW4A16Kernel.probe(torch.device("cuda"))
    if reason is not None:
        fail(f"cannot run the Triton kernels here: {reason}. This benchmark needs an NVIDIA GPU "
             "(compute capability >= 8.0) with a CUDA build of torch and triton; nothing was measured.")
    if os.environ.get("TRITON_INTERPRET", "") not in ("", "0"):
        fail("TRITON_INTERPRET is set: the kernels would run in the numpy interpreter; unset it to benchmark.")


def time_op(fn, flush: torch.Tensor, reps: int, warmup: int) -> float:
    """Median microseconds of ``fn()`` with the L2 flushed before each run."""
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        flush.zero_()  # evicts both operands from L2; queued ahead, so the launch overhead hides behind it
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3


def make_packed(k: int, n: int, group_size: int, act_order: bool, device):
    from lowbit import QuantizedWeight, QuantScheme
    from lowbit_cuda.packing import pack

    gen = torch.Generator().manual_seed(k * 31 + n)
    scheme = QuantScheme(4, group_size, act_order=act_order)
    ng = scheme.num_groups(k)
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(n, ng, generator=gen) * 0.01 + 0.001).to(torch.float16)
    zeros = torch.randint(0, 16, (n, ng), generator=gen, dtype=torch.uint8)
    g_idx = None
    if act_order:
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[torch.randperm(k, generator=gen)] = (torch.arange(k) // (k if group_size == -1 else group_size)).int()
    qw = QuantizedWeight(codes, scales, zeros, scheme, g_idx=g_idx)
    return qw, pack(qw, device)


def launcher(m: int):
    from lowbit_cuda import configs
    from lowbit_cuda.kernels.w4a16_gemm import w4a16_gemm
    from lowbit_cuda.kernels.w4a16_gemv import w4a16_gemv

    return ("gemv", w4a16_gemv) if m <= configs.GEMV_MAX_BATCH else ("gemm", w4a16_gemm)


def bench(args) -> list[dict]:
    device = torch.device("cuda")
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=device)
    rows = []
    for k, n in args.shapes:
        qw, packed = make_packed(k, n, args.group_size, args.act_order, device)
        w_fp16 = qw.dequantize(torch.float16).t().contiguous().to(device)  # [K, N]
        for m in args.batches:
            x = torch.randn(m, k, device=device, dtype=torch.float16)
            path, fn = launcher(m)
            ref = torch.matmul(x, w_fp16)
            err = float((fn(x, packed).float() - ref.float()).norm() / ref.float().norm())
            if err > 5e-3:
                fail(f"{k}x{n} batch {m}: the W4 result differs from fp16 by {err:.1e} (relative); not timing a wrong kernel")
            t16 = time_op(lambda x=x, w=w_fp16: torch.matmul(x, w), flush, args.reps, args.warmup)
            t4 = time_op(lambda x=x, fn=fn, p=packed: fn(x, p), flush, args.reps, args.warmup)
            weight_bytes = packed.qweight.numel() * 4 + packed.scales.numel() * 2 + (0 if packed.zeros is None else packed.zeros.numel())
            rows.append(dict(k=k, n=n, batch=m, path=path, fp16_us=t16, w4_us=t4, speedup=t16 / t4,
                             w4_gbps=weight_bytes / t4 / 1e3, rel_err=err, goal=GOALS.get((k, n, m))))
            print(f"  {k}x{n} batch {m}: fp16 {t16:.1f} us, w4 {t4:.1f} us ({path}), {t16 / t4:.2f}x", file=sys.stderr)
    return rows


def table(rows: list[dict], args) -> str:
    name = torch.cuda.get_device_name()
    import triton

    head = [
        f"GPU: {name}; torch {torch.__version__}; triton {triton.__version__}; "
        f"W4 g{args.group_size} asym{' act-order' if args.act_order else ''}; L2 flushed (256 MiB write) before every run; "
        f"median of {args.reps} runs.",
        "",
        "| K x N | batch | cuBLAS fp16 (us) | Triton W4 (us) | kernel | speedup | W4 weight GB/s | goal |",
        "|---|---:|---:|---:|---|---:|---:|---|",
    ]
    body = []
    for r in rows:
        goal = "" if r["goal"] is None else f">= {r['goal']}x {'met' if r['speedup'] >= r['goal'] else 'MISSED'}"
        body.append(f"| {r['k']}x{r['n']} | {r['batch']} | {r['fp16_us']:.1f} | {r['w4_us']:.1f} | {r['path']} | "
                    f"{r['speedup']:.2f}x | {r['w4_gbps']:.0f} | {goal} |")
    return "\n".join(head + body) + "\n"


# ---- --tune: search the launch configs on this GPU, print a configs.CONFIGS entry ------------

GEMV_SPACE = dict(BLOCK_N=[32, 64, 128], BLOCK_K=[64, 128, 256], SPLIT_K=[0, 1, 4], num_warps=[2, 4, 8], num_stages=[2, 3, 4])
GEMM_SPACE = dict(BLOCK_M=[32, 64, 128], BLOCK_N=[64, 128, 256], BLOCK_K=[32, 64, 128], SPLIT_K=[1, 2], GROUP_M=[8],
                  num_warps=[4, 8], num_stages=[2, 3, 4])


def tune(args) -> None:
    from lowbit_cuda import configs

    device = torch.device("cuda")
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=device)
    weights = [make_packed(k, n, args.group_size, args.act_order, device)[1] for k, n in args.shapes]
    entry = {}
    for kind, space, buckets in (("gemv", GEMV_SPACE, [1, 16]), ("gemm", GEMM_SPACE, [64, None])):
        _, fn = launcher(1 if kind == "gemv" else configs.GEMV_MAX_BATCH + 1)
        rows = []
        for bucket in buckets:
            m = bucket or 512
            best = None
            for values in itertools.product(*space.values()):
                cfg = dict(zip(space, values))
                cfg["BLOCK_M"] = cfg.get("BLOCK_M", 1 if m == 1 else 16)
                try:
                    times = []
                    for packed in weights:
                        x = torch.randn(m, packed.in_features, device=device, dtype=torch.float16)
                        times.append(time_op(lambda x=x, p=packed, c=cfg, f=fn: f(x, p, c), flush, 10, 2))
                except Exception as err:  # a config that does not compile (registers, shared memory)
                    print(f"  skip {cfg}: {type(err).__name__}", file=sys.stderr)
                    continue
                score = math.exp(statistics.mean(math.log(t) for t in times))
                if best is None or score < best[0]:
                    best = (score, cfg)
                    print(f"  {kind} M={m}: {score:.1f} us geomean {cfg}", file=sys.stderr)
            rows.append((bucket, best[1]))
        entry[kind] = rows
    print(f"    {torch.cuda.get_device_name()!r}: {entry!r},")


def parse_shape(s: str) -> tuple[int, int]:
    k, n = s.lower().split("x")
    return int(k), int(n)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", type=parse_shape, nargs="+", default=SHAPES, help="K x N, e.g. 8192x8192")
    p.add_argument("--batches", type=int, nargs="+", default=BATCHES)
    p.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128, -1])
    p.add_argument("--act-order", action="store_true", help="random act-order g_idx (x gathered in-kernel)")
    p.add_argument("--reps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--out", help="also write the markdown table here")
    p.add_argument("--tune", action="store_true", help="search launch configs; print an entry for lowbit_cuda/configs.py")
    args = p.parse_args(argv)
    require_gpu()
    if args.tune:
        tune(args)
        return
    text = table(bench(args), args)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
