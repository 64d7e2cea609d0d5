"""lowbit's checkpoint format: version 2 stores bit-packed codes (one copy, near the packed size);
version 1 checkpoints (unpacked uint8 codes) still read and verify."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lowbit import pipeline, read_checkpoint
from lowbit.checkpoint import FORMAT_VERSION, from_parts, stored_parts
from lowbit.errors import CheckpointError
from lowbit.hf import LazyTensors
from lowbit.scheme import QuantScheme
from lowbit.testing.kernels import make_qweight


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k", [64, 72, 100])  # whole blocks and rows padded to the next block
def test_stored_parts_round_trip(bits, k):
    qw = make_qweight(24, k, QuantScheme(bits, -1), seed=bits)
    parts = stored_parts(qw)
    assert parts["qcodes"].dtype == torch.int32 and "codes" not in parts
    assert parts["qcodes"].numel() * 32 >= 24 * k * bits > (parts["qcodes"].numel() - 24 * 3) * 32
    back = from_parts(parts, qw.scheme, k)
    assert back.equal(qw)


def test_qcodes_that_cannot_hold_the_width_are_one_error():
    qw = make_qweight(8, 64, QuantScheme(4, 32))
    with pytest.raises(CheckpointError, match="cannot hold 128 4-bit codes"):
        from_parts(stored_parts(qw), qw.scheme, 128)


def test_codes_are_stored_packed(tiny_dir, tmp_path):
    """The quantized tensors take the packed size: 4-bit codes at half a byte per weight."""
    pipeline.quantize(str(tiny_dir), scheme=QuantScheme(4, 32), out=tmp_path / "q", progress=False)
    ckpt = tmp_path / "q" / "lowbit"
    manifest = json.loads((ckpt / "lowbit.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION == 2 and "LSB-first" in manifest["codes_layout"]
    tensors = LazyTensors(ckpt)
    for mod, k in manifest["in_features"].items():
        n = tensors.shape(f"{mod}.scales")[0]
        assert tensors.shape(f"{mod}.qcodes") == [n, k * 4 // 32]
        assert f"{mod}.codes" not in tensors


def test_version_1_checkpoint_still_reads_and_verifies(tiny_dir, tmp_path):
    qm = pipeline.quantize(str(tiny_dir), scheme=QuantScheme(4, 32), progress=False)
    v1 = tmp_path / "v1"
    v1.mkdir()
    tensors = {k: v.contiguous() for k, v in qm.float_tensors.items()}
    for mod, qw in qm.qweights.items():
        tensors.update({f"{mod}.{p}": t for p, t in qw.tensors().items()})
    save_file(tensors, str(v1 / "model.safetensors"), metadata={"format": "pt"})
    qm.config.save_pretrained(str(v1))
    manifest = {"format": "lowbit", "format_version": 1, "scheme": qm.scheme.to_dict(),
                "quantized_modules": sorted(qm.qweights), "tensor_hash": qm.tensor_hash(),
                "float_hash": qm.float_hash()}
    (v1 / "lowbit.json").write_text(json.dumps(manifest))
    back = read_checkpoint(v1)
    assert back.diff(qm) == {}
    lazy = read_checkpoint(v1, lazy=True)
    assert lazy.diff(qm) == {}
    manifest["tensor_hash"] = "0" * 64
    (v1 / "lowbit.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="tensor_hash"):
        read_checkpoint(v1)
