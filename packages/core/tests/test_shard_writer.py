"""ShardWriter writes each shard once, in place: headers of every size, shards that split, and the
files read back by safetensors itself, with no second copy of a shard on disk at any moment."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors import safe_open

from lowbit import hf


def _tensors(n: int, rows: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dtypes = (torch.float32, torch.bfloat16, torch.int32, torch.uint8)
    return {f"model.layers.{i}.mlp.some_rather_long_module_name_{i}.weight":
            (torch.randn(rows, 5, generator=g) * 50).to(dtypes[i % len(dtypes)]) for i in range(n)}


def _write(tmp_path, tensors, **kw) -> list[str]:
    w = hf.ShardWriter(tmp_path, **kw)
    for name, t in tensors.items():
        w.add(name, t)
    return w.close()


def _read_all(tmp_path, names) -> dict[str, torch.Tensor]:
    out = {}
    for fname in names:
        with safe_open(str(tmp_path / fname), "pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    return out


def _header_len(path) -> int:
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


@pytest.mark.parametrize("case", ["exact", "padded", "header larger than the room"])
def test_every_header_case_reads_back(tmp_path, monkeypatch, case):
    tensors = _tensors(40)
    if case == "padded":  # a "large" shard: the header is padded into the room, the data stays put
        monkeypatch.setattr(hf, "_EXACT_HEADER_BYTES", 0)
    if case == "header larger than the room":  # the data moves towards the end of its own file
        monkeypatch.setattr(hf, "HEADER_ROOM", 256)
    names = _write(tmp_path, tensors)
    assert names == ["model.safetensors"]
    back = _read_all(tmp_path, names)
    assert back.keys() == tensors.keys()
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t)
    path = tmp_path / names[0]
    n = _header_len(path)
    data = sum(t.numel() * t.element_size() for t in tensors.values())
    assert os.path.getsize(path) == 8 + n + data  # no stray bytes after the data
    raw = path.read_bytes()[8:8 + n]
    assert json.loads(raw)["__metadata__"] == {"format": "pt"}
    if case == "padded":
        assert 8 + n == hf.HEADER_ROOM and raw.rstrip(b" ") != raw
    else:  # exact: padded to 8 bytes only
        assert len(raw.rstrip(b" ")) > n - 8
    assert not list(tmp_path.glob(".*")), "a shard's data file was left behind"


def test_shards_split_and_index(tmp_path):
    tensors = _tensors(12, rows=64)
    names = _write(tmp_path, tensors, max_shard_bytes=3000)
    assert len(names) > 1 and all(n.startswith("model-0000") for n in names)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    back = _read_all(tmp_path, names)
    assert all(torch.equal(back[k], t) for k, t in tensors.items())


def test_no_second_copy_of_a_shard(tmp_path):
    """Each shard is finished in the file its data was written to (same inode), so the disk never
    holds a second copy of a shard while the header goes in."""
    w = hf.ShardWriter(tmp_path, max_shard_bytes=3000)
    inodes = []
    for name, t in _tensors(12, rows=64).items():
        w.add(name, t)
        inodes.append(os.stat(w._shards[-1]["data"]).st_ino)
    names = w.close()
    assert sorted(os.stat(tmp_path / n).st_ino for n in names) == sorted(set(inodes))
