"""``lowbit eval tasks``: score a checkpoint on lm-evaluation-harness tasks through
:class:`lowbit.run.lm_eval.LowbitLM` (``pip install 'lowbit[eval]'``).

Kept apart from :mod:`lowbit.run.lm_eval` so that building the command line does not import lm-eval.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..errors import LowbitError
from .nn import LM_HEADS


def _limit(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (v >= 1 and v == int(v)) and not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of documents (1 or more) or a fraction in (0, 1), got {text}")
    return int(v) if v >= 1 else v


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .load import DTYPES

    p.description = (
        "Score a checkpoint on lm-evaluation-harness tasks (lm-eval 0.4) through lowbit's runtime. Tasks come "
        "from lm-eval, from lowbit (lowbit_wikitext2: the WikiText-2 test split shipped with lowbit, no download) "
        "and from --include-path directories of task YAMLs. Needs `pip install 'lowbit[eval]'`; lm-eval's own CLI: "
        "`python -m lowbit.run.lm_eval --model lowbit --model_args pretrained=CKPT ...`."
    )
    p.add_argument("checkpoint", help="any checkpoint lowbit reads, or a float model (HF directory, .gguf, demo)")
    p.add_argument("--tasks", required=True, help="comma-separated task or group names, e.g. lowbit_wikitext2")
    p.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="a directory of lm-eval task YAMLs (repeatable)")
    p.add_argument("--limit", type=_limit,
                   help="documents per task: a count, or a fraction of each task (default: all)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default: each task's own)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per forward for log-likelihoods (default: 1)")
    p.add_argument("--max-length", type=int, help="longest sequence scored (default: the model's context)")
    p.add_argument("--apply-chat-template", action="store_true", help="wrap prompts in the tokenizer's chat template")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="activation dtype (default: fp32)")
    p.add_argument("--kernel", help="force one kernel (see `lowbit kernels`)")
    p.add_argument("--lm-head", choices=LM_HEADS, default="float",
                   help="keep the checkpoint's float lm_head (default) or quantize it at load time")
    p.add_argument("--output", metavar="FILE", help="also write lm-eval's whole result (JSON) to FILE")
    p.add_argument("--json", action="store_true", help="print the scores as JSON")


def run(args) -> int:
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import make_table

        from .lm_eval import BUILTIN_TASKS, LowbitLM
    except ImportError as err:
        raise LowbitError(f"lowbit eval tasks needs lm-eval with its hf extra ({err}): "
                          "pip install 'lowbit[eval]'.") from None

    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise LowbitError(f"--num-fewshot must be 0 or more, got {args.num_fewshot}.")
    if args.batch_size < 1:
        raise LowbitError(f"--batch-size must be at least 1, got {args.batch_size}.")
    if args.max_length is not None and args.max_length < 2:
        raise LowbitError(f"--max-length must be at least 2, got {args.max_length}.")
    for d in args.include_path:
        if not Path(d).is_dir():
            raise LowbitError(f"--include-path {d} is not a directory.")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise LowbitError("--tasks names no task.")
    manager = TaskManager(include_path=[str(BUILTIN_TASKS), *args.include_path])
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise LowbitError(f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: not in lm-eval, "
                          "lowbit's built-in tasks (lowbit_wikitext2) or any --include-path.")
    extra = {"max_length": args.max_length} if args.max_length else {}
    lm = LowbitLM(args.checkpoint, dtype=args.dtype, kernel=args.kernel, lm_head=args.lm_head,
                  batch_size=args.batch_size, **extra)
    t0 = time.perf_counter()
    res = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                                  task_manager=manager, log_samples=False,
                                  apply_chat_template=args.apply_chat_template)
    seconds = time.perf_counter() - t0
    if args.output:
        Path(args.output).write_text(json.dumps(res, indent=2, default=str), encoding="utf-8")
    if args.json:
        print(json.dumps({"checkpoint": args.checkpoint, "results": res["results"], "n_samples": res.get("n-samples"),
                          "seconds": seconds}, indent=2, sort_keys=True, default=str))
        return 0
    print(f"lm-eval tasks on {args.checkpoint} ({args.dtype}), {seconds:.1f} s")
    print(make_table(res))
    if res.get("groups"):
        print(make_table(res, "groups"))
    return 0
