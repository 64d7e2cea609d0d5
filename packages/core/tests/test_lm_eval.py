"""lm-evaluation-harness on lowbit checkpoints: :class:`lowbit.run.lm_eval.LowbitLM` against lm-eval's
own ``hf`` model, and both entry points (``lowbit eval tasks`` and lm-eval's CLI) as processes.

No task data is downloaded: the tasks are ``lowbit_wikitext2`` (built in: the WikiText-2 test split
inside lowbit, rolling log-likelihood), and two written for this test in ``lm_eval_tasks/`` (a
12-question multiple-choice set, and six greedy ``generate_until`` prompts).

Needs ``lowbit[eval]``; skipped without it unless ``LOWBIT_TEST_EXTRAS=1`` (the ``serve-eval`` tox env).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

if os.environ.get("LOWBIT_TEST_EXTRAS"):
    import lm_eval
else:
    lm_eval = pytest.importorskip("lm_eval")

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
TASKS = ["lowbit_mc_tiny", "lowbit_gen_tiny", "lowbit_wikitext2"]
LIMITS = {"lowbit_wikitext2": 2}  # two articles: ~2 x 4k tokens, rolled in 512-token windows
STARTUP_S = 400  # lm-eval's import and task index, the model build, on a busy 2-core box

# Tolerances. Same weights, same fp32 arithmetic, same tokenization and windows: the float model
# through lowbit's class must match hf to rounding. The quantized checkpoint on lowbit's reference
# kernel (dequantize, fp32 matmul) against hf on the dequantized weights differs only in the order
# of floating-point operations.
FLOAT_ATOL = 1e-4  # per request log-likelihood (nats)
QUANT_ATOL = 2e-3  # per request; rolling requests sum ~4k tokens


@pytest.fixture(scope="module")
def manager():
    from lm_eval.tasks import TaskManager

    from lowbit.run.lm_eval import BUILTIN_TASKS

    return TaskManager(include_path=[str(BUILTIN_TASKS), str(TASKS_DIR)])


def _evaluate(lm, manager, tasks=TASKS) -> dict:
    """{task: (metrics, [per-document responses])} of one model over ``tasks``."""
    out = {}
    for task in tasks:
        res = lm_eval.simple_evaluate(model=lm, tasks=[task], limit=LIMITS.get(task), task_manager=manager,
                                      log_samples=True, bootstrap_iters=0)
        docs = sorted(res["samples"][task], key=lambda s: s["doc_id"])
        out[task] = (res["results"][task], [s["resps"] for s in docs])
    return out


def _compare(ours: dict, theirs: dict, atol: float) -> float:
    """Assert the same generations and metrics and log-likelihoods within ``atol``; the largest gap."""
    worst = 0.0
    for task in TASKS:
        (m1, r1), (m2, r2) = ours[task], theirs[task]
        assert len(r1) == len(r2) and r1, task
        if task == "lowbit_gen_tiny":  # a vacuous comparison would pass with nothing generated
            assert sum(bool(r[0][0]) for r in r1) >= len(r1) // 2, r1
        for a, b in zip(r1, r2):
            for x, y in zip(a, b):
                x, y = x[0], y[0]
                if isinstance(x, str):
                    assert x == y, f"{task}: generated {x!r}, hf generated {y!r}"
                elif isinstance(x, (list, tuple)):  # (loglikelihood, is_greedy)
                    worst = max(worst, abs(float(x[0]) - float(y[0])))
                    assert float(x[0]) == pytest.approx(float(y[0]), abs=atol), task
                    assert bool(x[1]) == bool(y[1]), task
                else:  # rolling: one float
                    worst = max(worst, abs(float(x) - float(y)))
                    assert float(x) == pytest.approx(float(y), abs=atol), task
        for k, v in m1.items():
            if isinstance(v, float) and "stderr" not in k:
                assert v == pytest.approx(m2[k], rel=1e-4, abs=1e-6), f"{task} {k}"
    return worst


def _hf(path) -> object:
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(path), device="cpu", dtype="float32", batch_size=1)


def test_float_model_through_lowbit_equals_hf(tiny_dir, manager):
    from lowbit.run.lm_eval import LowbitLM

    ours = _evaluate(LowbitLM(str(tiny_dir)), manager)
    theirs = _evaluate(_hf(tiny_dir), manager)
    gap = _compare(ours, theirs, FLOAT_ATOL)
    print(f"float model: largest log-likelihood gap to hf {gap:.2e}")
    wt = ours["lowbit_wikitext2"][0]
    assert math.isfinite(wt["word_perplexity,none"]) and wt["word_perplexity,none"] > 1


@pytest.fixture(scope="module")
def twin(ckpt, tmp_path_factory) -> Path:
    """The tiny checkpoint's dequantized weights as a plain float HF directory, for hf."""
    import torch

    from lowbit.exporting import read_checkpoint
    from lowbit.run.nn import build_float_model

    qm = read_checkpoint(str(ckpt))
    out = tmp_path_factory.mktemp("twin") / "float"
    build_float_model(qm, torch.float32).save_pretrained(str(out), safe_serialization=True)
    qm.tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def quant_scores(ckpt, manager):
    from lowbit.run.lm_eval import LowbitLM
    from lowbit.run.nn import kernels_used

    lm = LowbitLM(str(ckpt), kernel="reference")
    assert kernels_used(lm.model) == {"reference": 14}  # 2 layers x 7 linears run quantized
    return _evaluate(lm, manager)


def test_quantized_checkpoint_equals_hf_on_its_dequantized_weights(quant_scores, twin, manager):
    gap = _compare(quant_scores, _evaluate(_hf(twin), manager), QUANT_ATOL)
    print(f"quantized checkpoint: largest log-likelihood gap to hf on the dequantized twin {gap:.2e}")


def test_default_kernels_agree_with_the_reference_kernel(ckpt, manager, quant_scores):
    """The kernels lowbit picks on this machine score the multiple-choice set like the reference kernel
    (log-likelihoods within a looser bound: they may round activations)."""
    from lowbit.run.lm_eval import LowbitLM

    ours = _evaluate(LowbitLM(str(ckpt)), manager, ["lowbit_mc_tiny"])["lowbit_mc_tiny"][1]
    ref = quant_scores["lowbit_mc_tiny"][1]
    gaps = [abs(float(a[0][0]) - float(b[0][0])) for x, y in zip(ours, ref) for a, b in zip(x, y)]
    assert max(gaps) < 0.05 * max(1.0, max(abs(float(b[0][0])) for y in ref for b in y))


def _acc(results: dict) -> float:
    return results["lowbit_mc_tiny"]["acc,none"]


def test_lowbit_eval_tasks_command(ckpt, quant_scores, tmp_path):
    out = tmp_path / "res.json"
    r = subprocess.run([sys.executable, "-m", "lowbit.cli", "eval", "tasks", str(ckpt), "--tasks", "lowbit_mc_tiny",
                        "--include-path", str(TASKS_DIR), "--kernel", "reference", "--json", "--output", str(out)],
                       capture_output=True, text=True, timeout=STARTUP_S)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout)
    assert got["results"]["lowbit_mc_tiny"]["acc,none"] == quant_scores["lowbit_mc_tiny"][0]["acc,none"]
    assert got["n_samples"]["lowbit_mc_tiny"]["effective"] == 12
    assert _acc(json.loads(out.read_text())["results"]) == got["results"]["lowbit_mc_tiny"]["acc,none"]


def test_lm_evals_own_command_line(ckpt, quant_scores, tmp_path):
    r = subprocess.run([sys.executable, "-m", "lowbit.run.lm_eval", "--model", "lowbit",
                        "--model_args", f"pretrained={ckpt},kernel=reference", "--tasks", "lowbit_mc_tiny",
                        "--include_path", str(TASKS_DIR), "--output_path", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=STARTUP_S)
    assert r.returncode == 0, r.stderr[-3000:]
    files = list((tmp_path / "out").rglob("results_*.json"))
    assert len(files) == 1, r.stdout[-2000:]
    assert _acc(json.loads(files[0].read_text())["results"]) == quant_scores["lowbit_mc_tiny"][0]["acc,none"]
    assert "lowbit_mc_tiny" in r.stdout  # lm-eval's own results table


def test_registered_under_lowbit_at_import():
    from lm_eval.api.registry import get_model

    import lowbit.run.lm_eval as mod

    assert get_model("lowbit") is mod.LowbitLM


@pytest.mark.parametrize("argv,msg", [
    (["--tasks", "no_such_task"], "unknown task no_such_task"),
    (["--tasks", "lowbit_mc_tiny", "--include-path", "/nonexistent"], "--include-path /nonexistent is not a directory"),
    (["--tasks", "lowbit_mc_tiny", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["--tasks", "lowbit_mc_tiny", "--limit", "0"], "--limit"),
])
def test_bad_input_is_one_line_and_exit_2(ckpt, argv, msg):
    r = subprocess.run([sys.executable, "-m", "lowbit.cli", "eval", "tasks", str(ckpt), *argv],
                       capture_output=True, text=True, timeout=STARTUP_S)
    assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
