"""Hostile and damaged checkpoints (issue 21): names that escape the directory, planted pickles,
``auto_map`` code, and tampered lowbit checkpoints — refused with one line, nothing executed."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit.cli import main
from lowbit.errors import CheckpointError
from lowbit.exporting import read_checkpoint
from lowbit.hf import LazyTensors


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def copy(ckpt, tmp_path):
    return shutil.copytree(ckpt, tmp_path / "c")


def shard(copy, names: list[str]):
    """Point the index's first tensor at ``names[0]``; a single ``model.safetensors`` gets an index first."""
    if (copy / "model.safetensors").exists():
        tensors = load_file(str(copy / "model.safetensors"))
        (copy / "model.safetensors").unlink()
        save_file(tensors, str(copy / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
        weight_map = dict.fromkeys(tensors, "model-00001-of-00002.safetensors")
    else:
        weight_map = json.loads((copy / "model.safetensors.index.json").read_text())["weight_map"]
    weight_map[sorted(weight_map)[0]] = names[0]
    (copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("name", ["/etc/passwd", "../../other/model.safetensors", "../outside.safetensors"])
def test_index_names_escaping_the_directory_are_refused(capsys, copy, tmp_path, name):
    outside = tmp_path / "outside.safetensors"
    save_file({"x": torch.zeros(1)}, str(outside))
    shard(copy, [name])
    with pytest.raises(CheckpointError, match="refusing file name"):
        read_checkpoint(copy)
    code, _, err = run(capsys, "inspect", copy)
    assert code == 2 and "refusing file name" in one_line(err) and "root:" not in err  # /etc/passwd unread


def test_symlink_pointing_outside_is_refused(capsys, copy, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    held = LazyTensors(copy).file("model.norm.weight")
    shutil.move(held, outside / held.name)
    held.symlink_to(outside / held.name)
    code, _, err = run(capsys, "verify", copy)
    assert code == 2 and "points outside the checkpoint directory" in one_line(err)


def test_symlinked_config_to_a_fifo_does_not_hang(capsys, copy, tmp_path):
    (copy / "config.json").unlink()
    os.mkfifo(copy / "config.json")
    code, _, err = run(capsys, "verify", copy)
    assert code == 2 and "not a regular file" in one_line(err)


def test_hf_cache_snapshot_symlinks_still_read(ckpt, tmp_path):
    """…/snapshots/REV/file -> ../../blobs/HASH is how the HF cache stores every download."""
    repo = tmp_path / "models--o--n"
    snap, blobs = repo / "snapshots" / "rev", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in ckpt.iterdir():
        shutil.copy(f, blobs / f.name)
        (snap / f.name).symlink_to(os.path.relpath(blobs / f.name, snap))
    assert read_checkpoint(snap).tensor_hash() == read_checkpoint(ckpt).tensor_hash()


class Marker:
    """Unpickling this runs code: it writes the file named in LOWBIT_TEST_MARKER."""

    def __reduce__(self):
        return (exec, ("open(__import__('os').environ['LOWBIT_TEST_MARKER'], 'w').write('pwned')",))


def plant_pickles(d):
    torch.save({"model.embed_tokens.weight": Marker()}, d / "pytorch_model.bin")
    torch.save(Marker(), d / "model.pt")
    import pickle

    (d / "weights.pkl").write_bytes(pickle.dumps(Marker()))


def test_planted_pickles_are_never_unpickled(capsys, ckpt, tiny_dir, tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    monkeypatch.setenv("LOWBIT_TEST_MARKER", str(marker))
    torch.load(_pickle_dir(tmp_path) / "pytorch_model.bin", weights_only=False)  # the payload works…
    assert marker.exists()
    marker.unlink()
    q = shutil.copytree(ckpt, tmp_path / "q")
    plant_pickles(q)
    code, _, err = run(capsys, "verify", q, ckpt)
    assert code == 0, err
    # a float model with only pickled weights: refused, not loaded
    only_pickle = tmp_path / "only-pickle"
    only_pickle.mkdir()
    for f in tiny_dir.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, only_pickle / f.name)
    plant_pickles(only_pickle)
    code, _, err = run(capsys, "quantize", only_pickle, "--out", tmp_path / "o1", "--no-progress", "--group-size", "32")
    assert code == 2 and "cannot load the weights" in one_line(err)
    # beside safetensors, the pickles are ignored
    both = shutil.copytree(tiny_dir, tmp_path / "both")
    plant_pickles(both)
    code, _, err = run(capsys, "quantize", both, "--out", tmp_path / "o2", "--no-progress", "--group-size", "32")
    assert code == 0, err
    assert not marker.exists()


def _pickle_dir(tmp_path):
    d = tmp_path / "payload"
    d.mkdir(exist_ok=True)
    plant_pickles(d)
    return d


EVIL = "import os\nopen(os.environ['LOWBIT_TEST_MARKER'], 'w').write('pwned')\n" \
       "from transformers import LlamaConfig\nclass EvilConfig(LlamaConfig):\n    model_type = 'evil'\n"


def plant_auto_map(d, model_type: str):
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = model_type
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                       "AutoModelForCausalLM": "configuration_evil.EvilConfig"}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "configuration_evil.py").write_text(EVIL)
    tok = d / "tokenizer_config.json"
    if tok.exists():
        tcfg = json.loads(tok.read_text())
        tcfg["auto_map"] = {"AutoTokenizer": ["configuration_evil.EvilConfig", None]}
        tok.write_text(json.dumps(tcfg))


@pytest.mark.parametrize("model_type", ["llama", "evil"])
def test_auto_map_code_never_runs_without_trust_remote_code(capsys, ckpt, tiny_dir, tmp_path, monkeypatch, model_type):
    marker = tmp_path / "marker"
    monkeypatch.setenv("LOWBIT_TEST_MARKER", str(marker))
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    q = shutil.copytree(ckpt, tmp_path / "q")
    plant_auto_map(q, model_type)
    code, _, err = run(capsys, "inspect", q)
    if model_type == "evil":
        assert code == 2 and "config.json cannot be read" in one_line(err)
    f = shutil.copytree(tiny_dir, tmp_path / "f")
    plant_auto_map(f, model_type)
    code, _, err = run(capsys, "quantize", f, "--out", tmp_path / "o", "--no-progress", "--group-size", "32")
    if model_type == "evil":
        assert code == 2 and "--trust-remote-code" in one_line(err)
    else:
        assert code == 0, err
    assert not marker.exists()


# ------------------------------------------------------------------------------------ integrity
def flip_byte(path, tensor: str):
    """Flip one byte inside ``tensor``'s data in a safetensors file (header untouched)."""
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    start, end = header[tensor]["data_offsets"]
    raw[8 + n + (start + end) // 2] ^= 0x01  # the lowest bit: a code stays in range
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("tensor", ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                                    "model.layers.0.self_attn.q_proj.qcodes"])
def test_a_flipped_byte_in_any_tensor_is_caught(capsys, copy, tensor):
    flip_byte(LazyTensors(copy).file(tensor), tensor)
    code, _, err = run(capsys, "verify", copy)
    assert code == 2 and "hash" in one_line(err)


@pytest.mark.parametrize("name", ["model.extra.weight", "model.layers.0.self_attn.q_proj.weight"])
def test_an_extra_tensor_is_refused(capsys, copy, name):
    held = LazyTensors(copy).file("model.layers.0.self_attn.q_proj.scales")
    tensors = load_file(str(held))
    tensors[name] = torch.zeros(4)
    save_file(tensors, str(held), metadata={"format": "pt"})
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    index["weight_map"][name] = held.name
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    code, _, err = run(capsys, "verify", copy)
    assert code == 2 and ("float_hash" in err or "unexpected tensor" in err)
    one_line(err)


def test_nan_scales_are_refused(capsys, copy):
    held = LazyTensors(copy).file("model.layers.1.mlp.down_proj.scales")
    tensors = load_file(str(held))
    tensors["model.layers.1.mlp.down_proj.scales"][0, 0] = float("nan")
    save_file(tensors, str(held), metadata={"format": "pt"})
    manifest = json.loads((copy / "lowbit.json").read_text())
    manifest.pop("tensor_hash")  # a hostile manifest with no hash still gets finite scales checked
    (copy / "lowbit.json").write_text(json.dumps(manifest))
    code, _, err = run(capsys, "verify", copy)
    assert code == 2 and "tensor_hash" in one_line(err)
    manifest["tensor_hash"] = "0" * 64
    (copy / "lowbit.json").write_text(json.dumps(manifest))
    code, _, err = run(capsys, "verify", copy)
    assert code == 2 and "NaN or Inf" in one_line(err)


def test_inspect_says_what_is_verified(capsys, ckpt):
    code, out, err = run(capsys, "inspect", ckpt, "--json")
    assert code == 0, err
    assert json.loads(out)["verified"] == {"quantized tensors": "yes (tensor_hash, with scheme, codes layout and shapes)",
                                           "float tensors": "yes (float_hash)"}


def test_float_model_index_naming_outside_files_is_refused(capsys, tiny_dir, tmp_path):
    """The float model lowbit quantizes is read by transformers: its index is checked first."""
    f = shutil.copytree(tiny_dir, tmp_path / "f")
    shard(f, ["/etc/passwd"])
    code, _, err = run(capsys, "quantize", f, "--out", tmp_path / "o", "--no-progress", "--group-size", "32")
    assert code == 2 and "refusing file name '/etc/passwd'" in one_line(err)
    assert not (tmp_path / "o").exists()
