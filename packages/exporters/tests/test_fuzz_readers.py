"""Fuzzing every checkpoint reader with hypothesis (issue 21).

Each example copies one seed checkpoint (a tiny seeded random llama, quantized and written once per
session in lowbit, AutoAWQ GEMM/GEMV, GPTQ v1/v2 and xFT formats), applies one mutation — a
truncated file, flipped bytes in a header or in tensor data, a tensor of the wrong dtype or shape,
NaN/Inf scales, out-of-range g_idx or zeros, a dropped/added/renamed tensor, a bogus or huge JSON
or config.ini value, wrong bits/group_size — and reads it back. The property: the read raises a
LowbitError of one line, or it returns a correct model (every weight consistent, scales finite,
dequantizable; for lowbit's own hashed format, identical to the seed). Never another exception,
a hang (a 20 s alarm per read) or a huge allocation (address space capped at +2 GiB per read).

The default run is derandomized and small (about half a minute). ``LOWBIT_FUZZ=long`` runs a
random, much longer campaign (``LOWBIT_FUZZ_EXAMPLES``, default 2000 per format) for benchmarks or
before a release: ``LOWBIT_FUZZ=long pytest packages/exporters/tests/test_fuzz_readers.py``.
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from exporters_testlib import tiny_qmodel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from lowbit import LowbitError, QuantScheme, export, read_checkpoint
from lowbit.testing.faults import bounded

LONG = os.environ.get("LOWBIT_FUZZ") == "long"
_common = dict(deadline=None, suppress_health_check=list(HealthCheck), database=None)
settings.register_profile("lowbit-fuzz", max_examples=24, derandomize=True, print_blob=True, **_common)
settings.register_profile("lowbit-fuzz-long", max_examples=int(os.environ.get("LOWBIT_FUZZ_EXAMPLES", "2000")),
                          print_blob=True, **_common)
PROFILE = settings.get_profile("lowbit-fuzz-long" if LONG else "lowbit-fuzz")

#: format → scheme of its seed (together: act-order g_idx, 3- and 4-bit, sym and asym, per channel)
SEEDS = {
    "lowbit": QuantScheme(3, 32, act_order=True),
    "autoawq": QuantScheme(4, 32),
    "autoawq-gemv": QuantScheme(4, 32),
    "gptq": QuantScheme(4, 32, sym=True, act_order=True),
    "gptq-v2": QuantScheme(3, 32),
    "xft": QuantScheme(4, -1),
}
#: a small llama: one layer, every dimension a multiple of 32 (GPTQ) and of 8 (AWQ)
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, vocab_size=96, max_position_embeddings=64)


@pytest.fixture(scope="session")
def seeds(tmp_path_factory):
    """format → (seed directory, the QuantizedModel read back from it)."""
    root = tmp_path_factory.mktemp("fuzz-seeds")
    out = {}
    for fmt, scheme in SEEDS.items():
        path = export(tiny_qmodel(scheme, seed=7, **SHAPE), fmt, root / fmt)
        out[fmt] = (path, read_checkpoint(path))
    return out


# ----------------------------------------------------------------------------------- mutations
HOSTILE = [None, True, -1, 0, 1, 3, 5, 16, 100, 2**31, 2**63, -(2**63), 10**30, 1.5, 1e308, float("nan"),
           float("inf"), "", "x", "gemv", "gemm", "gptq_v2", "marlin", "awq", "-1", "1e9" * 1000, [], [1, 2], {},
           {"a": {"b": []}}]
QUANT_KEYS = ["bits", "w_bit", "group_size", "q_group_size", "sym", "desc_act", "zero_point", "version",
              "checkpoint_format", "format", "quant_method", "act_order"]
INI_VALUES = ["-1", "0", "1", "7", "4096", "99999999999", "1e999", "nan", "x", "", "uint4", "int8", "fp16", "bf16",
              "fp32", "llama", "sym", "asym"]
SPECIAL_FLOATS = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 65504.0, 1e30, -1.0]
SPECIAL_INTS = [-1, 2**31 - 1, -(2**31), 255, 256, 16, 9999]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.uint8, torch.int8, torch.bool]


def _files(d: Path, suffix: str = "") -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and p.name.endswith(suffix))


def _paths(obj, prefix=()):
    """Every key path of a JSON object (dicts only), outermost first."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield (*prefix, k)
            yield from _paths(v, (*prefix, k))


def truncate(d: Path, data) -> str:
    f = data.draw(st.sampled_from(_files(d)), label="file")
    size = f.stat().st_size
    keep = data.draw(st.integers(0, max(size - 1, 0)), label="keep bytes")
    f.write_bytes(f.read_bytes()[:keep])
    return f"truncate {f.name} to {keep} of {size} bytes"


def flip_bytes(d: Path, data) -> str:
    f = data.draw(st.sampled_from(_files(d)), label="file")
    raw = bytearray(f.read_bytes())
    if not raw:
        return "nothing to flip"
    header = 8 + int.from_bytes(raw[:8], "little") if f.suffix == ".safetensors" else min(len(raw), 64)
    region = data.draw(st.sampled_from(["header", "anywhere"]), label="region")
    hi = min(header, len(raw)) if region == "header" else len(raw)
    flips = data.draw(st.lists(st.tuples(st.integers(0, hi - 1), st.integers(1, 255)), min_size=1, max_size=4))
    for pos, mask in flips:
        raw[pos] ^= mask
    f.write_bytes(bytes(raw))
    return f"flip {f.name} {region} {flips}"


def edit_json(d: Path, data) -> str:
    files = _files(d, ".json")
    if not files:
        return "no json"
    f = data.draw(st.sampled_from(files), label="file")
    obj = json.loads(f.read_text())
    paths = list(_paths(obj))
    quant = [p for p in paths if p[-1] in QUANT_KEYS]
    path = data.draw(st.sampled_from(quant) if quant and data.draw(st.booleans()) else st.sampled_from(paths),
                     label="key")
    value = data.draw(st.sampled_from(HOSTILE + ["__delete__"]), label="value")
    node = obj
    for k in path[:-1]:
        node = node[k]
    if value == "__delete__":
        del node[path[-1]]
    else:
        node[path[-1]] = value
    f.write_text(json.dumps(obj))
    return f"{f.name}: {'.'.join(path)} = {value!r}"[:200]


def edit_ini(d: Path, data) -> str:
    ini = d / "config.ini"
    if not ini.exists():
        return "no config.ini"
    cp = configparser.ConfigParser()
    cp.read(ini)
    sec = cp[cp.sections()[0]]
    key = data.draw(st.sampled_from(sorted(sec)), label="key")
    value = data.draw(st.sampled_from([*INI_VALUES, "__delete__"]), label="value")
    if value == "__delete__":
        del sec[key]
    else:
        sec[key] = value
    with open(ini, "w") as fh:
        cp.write(fh)
    return f"config.ini {key} = {value!r}"


def edit_tensor(d: Path, data) -> str:
    """One tensor of a safetensors file: wrong dtype/shape, special values, dropped, added, renamed."""
    files = _files(d, ".safetensors")
    if not files:
        return edit_bin(d, data)
    f = data.draw(st.sampled_from(files), label="file")
    tensors = load_file(str(f))
    name = data.draw(st.sampled_from(sorted(tensors)), label="tensor")
    t = tensors[name]
    op = data.draw(st.sampled_from(["dtype", "shape", "special", "drop", "add", "rename", "transpose"]), label="op")
    if op == "dtype":
        dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
        tensors[name] = t.to(dtype)
        what = str(dtype)
    elif op == "shape":
        cut = data.draw(st.sampled_from(["flatten", "drop row", "add row", "scalar", "empty"]), label="shape")
        if cut == "flatten":
            tensors[name] = t.reshape(-1)
        elif cut == "drop row":
            tensors[name] = t[:-1].contiguous() if t.dim() and t.shape[0] > 1 else t.reshape(1, -1)
        elif cut == "add row":
            tensors[name] = torch.cat([t, t[:1]]) if t.dim() else t.reshape(1)
        elif cut == "scalar":
            tensors[name] = t.reshape(-1)[:1].reshape(())
        else:
            tensors[name] = t.reshape(-1)[:0]
        what = cut
    elif op == "special":
        flat = t.reshape(-1).clone()
        if flat.numel():
            i = data.draw(st.integers(0, flat.numel() - 1), label="index")
            if t.is_floating_point():
                v = data.draw(st.sampled_from(SPECIAL_FLOATS), label="value")
            else:
                v = data.draw(st.sampled_from(SPECIAL_INTS), label="value")
                info = torch.iinfo(t.dtype)
                v = max(info.min, min(info.max, v))
            everywhere = data.draw(st.booleans(), label="everywhere")
            if everywhere:
                flat[:] = v
            else:
                flat[i] = v
            tensors[name] = flat.reshape(t.shape)
            what = f"{v} {'everywhere' if everywhere else f'at {i}'}"
        else:
            what = "empty"
    elif op == "drop":
        del tensors[name]
        what = ""
    elif op == "add":
        extra = data.draw(st.sampled_from([name + "_extra", name.rpartition(".")[0] + ".weight",
                                           name.rpartition(".")[0] + ".g_idx", "model.unexpected"]), label="new name")
        tensors[extra] = t.clone()
        what = extra
    elif op == "rename":
        tensors[name + ".moved"] = tensors.pop(name)
        what = ""
    else:
        tensors[name] = t.t().contiguous() if t.dim() == 2 else t
        what = ""
    save_file(tensors, str(f), metadata={"format": "pt"})
    return f"{f.name}: {name} {op} {what}"


def edit_bin(d: Path, data) -> str:
    """An xFT scales/zeros file: special fp32 values at one position or everywhere."""
    files = [f for f in _files(d, ".bin") if ".scales." in f.name or ".zeros." in f.name]
    f = data.draw(st.sampled_from(files), label="file")
    raw = bytearray(f.read_bytes())
    n = len(raw) // 4
    v = data.draw(st.sampled_from(SPECIAL_FLOATS), label="value")
    i = data.draw(st.integers(0, n - 1), label="index")
    idx = range(n) if data.draw(st.booleans(), label="everywhere") else [i]
    for j in idx:
        raw[4 * j:4 * j + 4] = struct.pack("<f", v)
    f.write_bytes(bytes(raw))
    return f"{f.name}: {v} at {'all' if len(idx) > 1 else i}"


MUTATIONS = {"truncate": truncate, "flip": flip_bytes, "json": edit_json, "ini": edit_ini, "tensor": edit_tensor}


# ----------------------------------------------------------------------------------- the property
def check_read(path: Path, fmt: str, seed) -> None:
    """The property: one-line LowbitError, or a correct read."""
    try:
        with bounded():
            qm = read_checkpoint(path)
    except LowbitError as err:
        msg = str(err)
        assert msg and "\n" not in msg, f"not one line: {msg!r}"
        assert "allocate" not in msg, f"a huge allocation was attempted: {msg}"
        return
    for mod, qw in qm.qweights.items():
        qw.validate()
        assert torch.isfinite(qw.scales).all(), mod
        assert torch.isfinite(qw.dequantize()).all(), mod
    if fmt == "lowbit":  # hashed: any change to a tensor must have been refused
        assert qm.tensor_hash() == seed.tensor_hash() and qm.float_hash() == seed.float_hash()


@pytest.mark.parametrize("fmt", list(SEEDS))
def test_readers_survive_mutations(seeds, fmt):
    seed_dir, seed = seeds[fmt]
    kinds = [k for k in MUTATIONS if not (k == "ini" and fmt != "xft")]

    @PROFILE
    @given(kind=st.sampled_from(kinds), data=st.data())
    def fuzz(kind, data):
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(shutil.copytree(seed_dir, Path(tmp) / "ckpt"))
            note = MUTATIONS[kind](d, data)
            data.draw(st.just(note), label="mutation")
            check_read(d, fmt, seed)

    fuzz()


def test_seeds_read_back_exactly(seeds):
    """The fuzzing starts from good checkpoints: each reads back as written."""
    for fmt, (_path, qm) in seeds.items():
        ref = tiny_qmodel(SEEDS[fmt], seed=7, **SHAPE)
        assert qm.diff(ref) == {}, fmt
