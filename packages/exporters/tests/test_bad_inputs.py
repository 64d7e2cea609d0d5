"""Bad input: formats that cannot hold a scheme (refused before any work), unreadable, foreign and
truncated checkpoints, and config that disagrees with the tensors — each one clear line."""

from __future__ import annotations

import json

import pytest
import torch
from exporters_testlib import tiny_config, tiny_qmodel
from safetensors.torch import load_file, save_file

from lowbit import CheckpointError, QuantScheme, UnsupportedSchemeError, export, read_checkpoint, registry
from lowbit.exporting import check_formats


def one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg
    return msg


@pytest.mark.parametrize("fmt, scheme, config, match", [
    ("xft", QuantScheme(4, 64), None, "group_size=-1"),
    ("xft", QuantScheme(3, -1), None, "4-bit"),
    ("xft", QuantScheme(4, -1), tiny_config(model_type="mistral"), "model types"),
    ("xft", QuantScheme(4, -1), tiny_config(attention_bias=True), "bias"),
    ("autoawq", QuantScheme(3, 64), None, "4-bit weights only"),
    ("autoawq", QuantScheme(8, 64), None, "4-bit weights only"),
    ("autoawq", QuantScheme(4, 64, act_order=True), None, "act-order"),
    ("autoawq-gemv", QuantScheme(4, -1), None, "group sizes"),
    ("gptq", QuantScheme(4, 64), None, "gptq-v2"),
    ("gptq", QuantScheme(4, -1, sym=True), tiny_config(hidden_size=80, num_attention_heads=4), "multiples of 32"),
    ("gptq-v2", QuantScheme(4, -1), tiny_config(intermediate_size=200), "multiples of 32"),
])
def test_format_cannot_hold_scheme(fmt, scheme, config, match):
    assert registry("exporters").get(fmt).check(scheme, config)
    with pytest.raises(UnsupportedSchemeError) as err:
        check_formats([fmt], scheme, config)
    msg = one_line(err)
    assert match in msg and fmt in msg and "Formats that can" in msg


def test_holdable_schemes_pass():
    cfg = tiny_config()
    assert registry("exporters").get("xft").check(QuantScheme(4, -1), cfg) is None
    assert registry("exporters").get("autoawq").check(QuantScheme(4, 128), cfg) is None
    assert registry("exporters").get("gptq").check(QuantScheme(3, 32, sym=True, act_order=True), cfg) is None
    assert registry("exporters").get("gptq-v2").check(QuantScheme(2, 64), cfg) is None


def test_refused_export_writes_nothing(tmp_path):
    qm = tiny_qmodel(QuantScheme(4, 64))
    with pytest.raises(UnsupportedSchemeError):
        export(qm, "xft", tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def gptq_dir(tmp_path_factory):
    return export(tiny_qmodel(QuantScheme(4, 32, sym=True, act_order=True)), "gptq", tmp_path_factory.mktemp("g") / "g")


def copy(src, dst):
    import shutil

    return shutil.copytree(src, dst)


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    qc = cfg.setdefault("quantization_config", {})
    for k, v in changes.items():
        if k.startswith("model_"):
            cfg[k[len("model_"):]] = v
        else:
            qc[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


def edit_tensors(path, fn):
    t = load_file(str(path / "model.safetensors"))
    fn(t)
    save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_truncated_safetensors(tmp_path, gptq_dir):
    d = copy(gptq_dir, tmp_path / "t")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(d)
    assert "truncated" in one_line(err)


def test_foreign_directories(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(tmp_path / "junk")
    assert "not a checkpoint lowbit can read" in one_line(err)
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config()).save_pretrained(str(tmp_path / "float"))
    with pytest.raises(CheckpointError):
        read_checkpoint(tmp_path / "float")
    for fmt in ("gptq", "autoawq", "xft"):
        with pytest.raises(CheckpointError) as err:
            registry("exporters").get(fmt)().read(tmp_path / "float")
        one_line(err)


def test_unreadable_config(tmp_path, gptq_dir):
    d = copy(gptq_dir, tmp_path / "u")
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError) as err:
        registry("exporters").get("gptq")().read(d)
    one_line(err)


@pytest.mark.parametrize("changes, match", [
    ({"bits": 8}, "config and tensors disagree"),
    ({"bits": 3}, "config and tensors disagree"),
    ({"group_size": 64}, "config and tensors disagree"),
    ({"desc_act": False}, "desc_act is false"),
    ({"group_size": 16}, "outside what lowbit holds"),
    ({"checkpoint_format": "marlin", "format": "marlin"}, "not readable"),
    ({"model_hidden_size": 96, "model_num_attention_heads": 3}, "config and tensors disagree"),
])
def test_gptq_config_disagrees(tmp_path, gptq_dir, changes, match):
    d = copy(gptq_dir, tmp_path / "c")
    edit_config(d, **changes)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(d, "gptq")
    assert match in one_line(err)


def test_gptq_missing_tensor(tmp_path, gptq_dir):
    d = copy(gptq_dir, tmp_path / "m")
    edit_tensors(d, lambda t: t.pop("model.layers.0.mlp.up_proj.qzeros"))
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(d)
    assert "qzeros" in one_line(err)


def test_gptq_orphan_qzeros(tmp_path, gptq_dir):
    d = copy(gptq_dir, tmp_path / "o")
    edit_tensors(d, lambda t: t.pop("model.layers.1.self_attn.k_proj.qweight"))
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(d)
    assert "has no model.layers.1.self_attn.k_proj.qweight" in one_line(err)


def test_sym_config_with_asym_zeros(tmp_path):
    d = export(tiny_qmodel(QuantScheme(4, 64)), "gptq-v2", tmp_path / "v2")
    edit_config(d, sym=True)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(d)
    assert "symmetric" in one_line(err)
    a = export(tiny_qmodel(QuantScheme(4, 64)), "autoawq", tmp_path / "awq")
    edit_config(a, zero_point=False)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(a)
    assert "symmetric" in one_line(err)


@pytest.mark.parametrize("changes, match", [
    ({"bits": 3}, "4-bit only"),
    ({"group_size": 32}, "config and tensors disagree"),
    ({"version": "gemv_fast"}, "not readable"),
])
def test_awq_config_disagrees(tmp_path, changes, match):
    d = export(tiny_qmodel(QuantScheme(4, 64)), "autoawq", tmp_path / "a")
    edit_config(d, **changes)
    with pytest.raises(CheckpointError) as err:
        registry("exporters").get("autoawq")().read(d)
    assert match in one_line(err)


def test_awq_gemv_read_as_gemm_shape_mismatch(tmp_path):
    d = export(tiny_qmodel(QuantScheme(4, 64)), "autoawq-gemv", tmp_path / "a")
    edit_config(d, version="gemm")
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(d)
    one_line(err)


@pytest.fixture(scope="module")
def xft_dir(tmp_path_factory):
    return export(tiny_qmodel(QuantScheme(4, -1)), "xft", tmp_path_factory.mktemp("x") / "x")


def test_xft_truncated_bin(tmp_path, xft_dir):
    d = copy(xft_dir, tmp_path / "t")
    f = d / "model.layers.1.mlp.down_proj.qweight.0.bin"
    f.write_bytes(f.read_bytes()[:-3])
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(d)
    assert "truncated" in one_line(err)


@pytest.mark.parametrize("old, new, match", [
    ("quant_groupsize = -1", "quant_groupsize = 128", "per-channel"),
    ("inter_size = 256", "inter_size = 128", "disagree"),
    ("quant_qweight_data_type = uint4", "quant_qweight_data_type = int8", "disagree"),
    ("head_num = 4", "head_num = four", "non-integer"),
    ("[llama]", "", "cannot be parsed"),
])
def test_xft_config_disagrees(tmp_path, xft_dir, old, new, match):
    d = copy(xft_dir, tmp_path / "c")
    ini = (d / "config.ini").read_text()
    assert old in ini
    (d / "config.ini").write_text(ini.replace(old, new))
    with pytest.raises(CheckpointError) as err:
        registry("exporters").get("xft")().read(d)
    assert match in one_line(err)


def test_xft_zeros_not_integer(tmp_path, xft_dir):
    import numpy as np

    d = copy(xft_dir, tmp_path / "z")
    f = d / "model.layers.0.attention.dense.zeros.0.bin"
    z = np.fromfile(f, dtype="<f4")
    s = np.fromfile(d / "model.layers.0.attention.dense.scales.0.bin", dtype="<f4")
    z[3] -= 0.5 * s[3]
    z.tofile(f)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(d)
    assert "zeros are not" in one_line(err)


def test_xft_float_model_is_refused(tmp_path, xft_dir):
    d = copy(xft_dir, tmp_path / "f")
    ini = (d / "config.ini").read_text().replace("quant_qweight_data_type = uint4\n", "")
    (d / "config.ini").write_text(ini)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(d)
    assert "not float ones" in one_line(err)
