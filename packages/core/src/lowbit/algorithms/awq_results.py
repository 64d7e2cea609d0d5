"""AWQ search results on disk: ``--dump-awq`` writes them, ``--load-awq`` applies them to the same model.

A results file is safetensors (the searched scales per group and clip values per linear, and a small
probe of the model's weights) with its JSON description in the metadata and in a ``.json`` sidecar:
format, version, scheme, options, the model's identity (every quantized linear's name and shape, a
hash of the architecture's config fields) and per layer which groups and linears each tensor is for.
Nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, LowbitError, UnsupportedSchemeError
from ..scheme import QuantScheme

FORMAT = "lowbit-awq"
FORMAT_VERSION = 1


def model_identity(model: nn.Module, adapter: Any) -> tuple[dict, torch.Tensor]:
    """Names and shapes of every linear the adapter quantizes, a hash of the architecture's config
    fields, and a small probe of the first linear's weights (to tell same-shaped models apart)."""
    linears: dict[str, list[int]] = {}
    layers = adapter.layers(model)
    first = None
    for i, layer in enumerate(layers):
        for g in adapter.groups(layer):
            for p in g.linears:
                w = layer.get_submodule(p).weight
                linears[adapter.layer_prefix(i) + p] = list(w.shape)
                if first is None:
                    first = w
    cfg = getattr(model, "config", None)
    fields = {k: getattr(cfg, k, None) for k in ("model_type", "hidden_size", "intermediate_size",
                                                  "num_hidden_layers", "num_attention_heads",
                                                  "num_key_value_heads", "head_dim", "vocab_size")}
    fields = {k: v for k, v in fields.items() if isinstance(v, (int, str))}
    chash = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    probe = first.detach()[:8, :64].float().clone() if first is not None else torch.zeros(0)
    return {"config": fields, "config_hash": chash, "linears": linears}, probe


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json") if path.suffix == ".safetensors" else path.with_name(path.name + ".json")


def write_results(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write ``path`` (safetensors, the json in its metadata) and ``path``'s .json sidecar atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    text = json.dumps(meta, indent=1, sort_keys=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp_json = path.with_name(f".{_sidecar(path).name}.tmp-{os.getpid()}")
    try:
        path.absolute().parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(tmp), metadata={FORMAT: text})
        tmp_json.write_text(text + "\n")
        os.replace(tmp_json, _sidecar(path))
        os.replace(tmp, path)
    except OSError as e:
        for t in (tmp, tmp_json):  # nothing half-written stays beside the dump
            with contextlib.suppress(OSError):
                t.unlink(missing_ok=True)
        raise LowbitError(f"cannot write the awq dump {path}: {e.strerror or e}; pick another --dump-awq path.") from e


def read_results(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by :func:`write_results` (no pickle: safetensors + json)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"load-awq file {path} does not exist; pass a file written by --dump-awq.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(FORMAT, "null"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, ValueError, RuntimeError) as e:  # safetensors raises SafetensorError (a ValueError/OSError)
        raise CheckpointError(f"load-awq file {path} is not a safetensors file written by --dump-awq ({e}).") from e
    except Exception as e:  # noqa: BLE001 - safetensors' own error type is not importable everywhere
        raise CheckpointError(f"load-awq file {path} is not a safetensors file written by --dump-awq ({e}).") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an awq dump (no {FORMAT} metadata); pass a file written by --dump-awq.")
    if meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"awq dump {path} has version {meta.get('version')}; this lowbit reads {FORMAT_VERSION}.")
    try:
        keys_per_layer = [[g["scales"] for g in rec["groups"]] + list(rec["clip"].values())
                          for rec in meta["layers"].values()]
        QuantScheme.from_dict(meta["scheme"])
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise CheckpointError(f"awq dump {path} has malformed metadata ({type(e).__name__}: {e}); "
                              "dump it again with --dump-awq.") from e
    for keys in keys_per_layer:
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise CheckpointError(f"awq dump {path} is truncated: tensor {missing[0]} is missing; dump it again.")
    return tensors, meta


def check_scheme(meta: dict, scheme: QuantScheme, path) -> None:
    made = QuantScheme.from_dict(meta["scheme"])
    if (made.bits, made.group_size, made.sym) != (scheme.bits, scheme.group_size, scheme.sym):
        raise UnsupportedSchemeError(
            f"load-awq file {path} was searched for {made.describe()}, asked for {scheme.describe()}; "
            "AWQ scales and clips are specific to bits, group size and symmetry: pass the same scheme or search again.")


def check_identity(loaded, identity: dict, probe: torch.Tensor, path) -> None:
    tensors, meta = loaded
    made = meta.get("model") or {}
    want, have = made.get("linears", {}), identity["linears"]
    if want != have:
        diff = sorted(set(want) ^ set(have))
        what = (f"{diff[0]} is in only one of them" if diff else
                next(f"{k} is {want[k]} there, {have[k]} here" for k in have if want.get(k) != have[k]))
        raise CheckpointError(f"load-awq file {path} was made for another model ({made.get('config', {}).get('model_type')}"
                              f" {made.get('config_hash')}; {what}); search again without --load-awq.")
    saved = tensors.get("probe.weight")
    if saved is not None and (saved.shape != probe.shape or not torch.allclose(saved, probe, rtol=1e-2, atol=1e-3)):
        raise CheckpointError(f"load-awq file {path} was made for another model with the same shapes (its weights "
                              "differ); search again without --load-awq.")
