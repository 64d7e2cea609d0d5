"""Foreign formats under attack (issue 21): NaN/Inf scales and out-of-range g_idx are refused on
read, escaping shard names are refused, and ``inspect`` says what a format without a hash cannot
vouch for (a flipped bit inside packed weights reads back silently)."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
from exporters_testlib import tiny_qmodel
from safetensors.torch import load_file, save_file

from lowbit import CheckpointError, QuantScheme, export, read_checkpoint
from lowbit.cli import main

SCHEMES = {"gptq": QuantScheme(4, 32, sym=True, act_order=True), "gptq-v2": QuantScheme(3, 32),
           "autoawq": QuantScheme(4, 32), "autoawq-gemv": QuantScheme(4, 64), "xft": QuantScheme(4, -1)}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("foreign")
    return {fmt: export(tiny_qmodel(s, seed=3), fmt, root / fmt) for fmt, s in SCHEMES.items()}


def edit(path, name, fn):
    t = load_file(str(path / "model.safetensors"))
    fn(t[name])
    save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})


def one_line(err) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg
    return msg


@pytest.mark.parametrize("fmt", ["gptq", "gptq-v2", "autoawq", "autoawq-gemv"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_scales_are_refused(dirs, tmp_path, fmt, value):
    d = shutil.copytree(dirs[fmt], tmp_path / "d")

    def poison(t):
        t[0, 1] = value

    edit(d, "model.layers.1.mlp.up_proj.scales", poison)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(d)
    assert "NaN or Inf" in one_line(err) and "up_proj" in str(err.value)


def test_xft_non_finite_scales_are_refused(dirs, tmp_path):
    d = shutil.copytree(dirs["xft"], tmp_path / "d")
    f = d / "model.layers.0.mlp.down_proj.scales.0.bin"
    raw = bytearray(f.read_bytes())
    raw[4:8] = struct.pack("<f", float("nan"))
    f.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(d)
    one_line(err)


@pytest.mark.parametrize("value", [-1, 4, 2**31 - 1])
def test_out_of_range_g_idx_is_refused(dirs, tmp_path, value):
    d = shutil.copytree(dirs["gptq"], tmp_path / "d")

    def poison(t):
        t[5] = value

    edit(d, "model.layers.0.self_attn.q_proj.g_idx", poison)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(d)
    assert "g_idx" in one_line(err)


def test_shard_names_escaping_the_directory_are_refused(dirs, tmp_path):
    d = shutil.copytree(dirs["gptq-v2"], tmp_path / "d")
    tensors = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    save_file(tensors, str(tmp_path / "model-00001-of-00001.safetensors"), metadata={"format": "pt"})
    weight_map = dict.fromkeys(tensors, "../model-00001-of-00001.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(d)
    assert "refusing file name" in one_line(err)


@pytest.mark.parametrize("fmt", list(SCHEMES))
def test_inspect_says_a_foreign_format_cannot_be_verified(dirs, capsys, fmt):
    assert main(["inspect", str(dirs[fmt]), "--json"]) == 0
    verified = json.loads(capsys.readouterr().out)["verified"]
    assert verified["quantized tensors"].startswith("no: ") and "no hash" in verified["quantized tensors"]
    assert verified["float tensors"].startswith("no: ")


def test_a_flipped_bit_in_gptq_qweight_is_what_inspect_warns_about(dirs, tmp_path):
    d = shutil.copytree(dirs["gptq"], tmp_path / "d")

    def flip(t):
        t[0, 0] ^= 1

    edit(d, "model.layers.0.mlp.gate_proj.qweight", flip)
    assert read_checkpoint(d).diff(read_checkpoint(dirs["gptq"]))  # read back silently, different


@pytest.mark.parametrize("name", ["model.wte.bin", "config.ini", "config.json"])
def test_xft_files_linked_from_outside_are_refused(dirs, tmp_path, name):
    d = shutil.copytree(dirs["xft"], tmp_path / "d")
    shutil.move(d / name, tmp_path / name)
    (d / name).symlink_to(tmp_path / name)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(d, "xft")
    assert "points outside the checkpoint directory" in one_line(err)
