"""Every built-in family end to end on a tiny random model: quantize, export AutoAWQ and GPTQ under
the names AutoAWQ / GPTQModel write, read back identical (``lowbit verify``), and run."""

import json

import pytest
import torch
from safetensors import safe_open

from lowbit import pipeline, read_checkpoint
from lowbit.cli import main
from lowbit.errors import UnsupportedSchemeError
from lowbit.recipe import Recipe
from lowbit.run.nn import build_float_model, build_model
from lowbit.scheme import QuantScheme
from lowbit.testing.models import save_tiny_model

# (family, method): rtn everywhere, gptq and awq spread so each family runs a calibrated method
CASES = [("phi3", "rtn"), ("phi3", "gptq"), ("gemma2", "awq"), ("gemma3_text", "gptq"), ("mixtral", "rtn"),
         ("mixtral", "gptq"), ("mixtral", "awq"), ("qwen2_moe", "awq"), ("qwen3_moe", "gptq"), ("gemma3", "gptq")]
#: a quantized and a float tensor of layer 0 in the AutoAWQ/GPTQ files, as AutoAWQ / GPTQModel name them
NAMES = {
    "phi3": ("model.layers.0.self_attn.qkv_proj.qweight", "model.layers.0.input_layernorm.weight"),
    "gemma2": ("model.layers.0.mlp.up_proj.qweight", "model.layers.0.pre_feedforward_layernorm.weight"),
    "gemma3_text": ("model.layers.0.mlp.up_proj.qweight", "model.layers.0.self_attn.q_norm.weight"),
    "mixtral": ("model.layers.0.block_sparse_moe.experts.3.w2.qweight", "model.layers.0.block_sparse_moe.gate.weight"),
    "qwen2_moe": ("model.layers.0.mlp.experts.3.down_proj.qweight", "model.layers.0.mlp.shared_expert_gate.weight"),
    "qwen3_moe": ("model.layers.0.mlp.experts.3.up_proj.qweight", "model.layers.0.mlp.gate.weight"),
    "gemma3": ("model.language_model.layers.1.self_attn.o_proj.qweight",
               "model.vision_tower.encoder.layers.0.self_attn.q_proj.weight"),
}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {mt: save_tiny_model(root / mt, mt) for mt in {c[0] for c in CASES}}


def _keys(d):
    keys = set()
    for f in d.glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            keys |= set(sf.keys())
    return keys


@pytest.mark.parametrize("model_type,method", CASES)
def test_family_quantizes_exports_and_reads_back_identical(family_dirs, tmp_path, capsys, model_type, method):
    out = tmp_path / "q"
    qm = pipeline.quantize(str(family_dirs[model_type]), method=method, scheme=QuantScheme(4, 32, sym=True),
                           nsamples=4, seqlen=32, batch_size=4, formats=["autoawq", "gptq"], out=out,
                           progress=False)
    # every expert linear quantized, routers and gates float
    assert not any(m.endswith((".gate", "shared_expert_gate")) for m in qm.qweights)
    assert main(["verify", str(out / "lowbit"), str(out / "autoawq"), str(out / "gptq"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["identical"] is True
    qname, fname = NAMES[model_type]
    for fmt in ("autoawq", "gptq"):
        keys = _keys(out / fmt)
        assert qname in keys and fname in keys, (fmt, sorted(keys)[:8])
    cfg = json.loads((out / "autoawq/config.json").read_text())["quantization_config"]
    if model_type in ("mixtral", "qwen3_moe"):
        assert cfg["modules_to_not_convert"] == [fname.split(".", 3)[3].rsplit(".", 1)[0]]
    if model_type == "gemma3":  # the vision tower stays float, and consumers are told so
        assert not any("vision_tower" in m for m in qm.qweights) and len(qm.qweights) == 2 * 7
        # as paths from the root (transformers 5 matches those) and bare (AutoAWQ and vLLM match substrings)
        assert {"model.vision_tower", "model.multi_modal_projector", "vision_tower",
                "multi_modal_projector"} <= set(cfg["modules_to_not_convert"])
    # the quantized model (QuantLinear, reference kernel) computes what its dequantized float twin does
    loaded = read_checkpoint(out / "gptq")
    ids = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = build_model(loaded, dtype=torch.float32)(ids).logits
        want = build_float_model(loaded, dtype=torch.float32)(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", ["phi3", "gemma2", "mixtral", "qwen2_moe"])
def test_xft_refuses_families_it_cannot_hold_before_quantizing(family_dirs, tmp_path, model_type):
    with pytest.raises(UnsupportedSchemeError, match="xFT export supports model types llama, qwen2"):
        pipeline.plan(str(family_dirs[model_type]), Recipe("rtn", QuantScheme(4, -1, sym=True), formats=("xft",)),
                      tmp_path / "x")
