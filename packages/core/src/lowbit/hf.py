"""HF-style directory pieces every format shares: config, tokenizer, generation config, and
safetensors files (``format: pt`` metadata, sharded with an index when large). Never pickle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError

SAFE_INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 4 * 1024**3


def write_config(config, out_dir: Path, quantization_config: dict | None = None, **extra: Any) -> None:
    """config.json with ``quantization_config`` set (or removed when None) and extra keys."""
    d = config.to_dict()
    d.pop("quantization_config", None)
    if quantization_config is not None:
        d["quantization_config"] = quantization_config
    d.update(extra)
    (out_dir / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


def write_extras(qmodel, out_dir: Path) -> None:
    """Tokenizer files and generation_config.json, when the model has them."""
    if qmodel.tokenizer is not None:
        qmodel.tokenizer.save_pretrained(str(out_dir))
    if qmodel.generation_config is not None:
        qmodel.generation_config.save_pretrained(str(out_dir))


def save_tensors(tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 prefix: str = "model") -> list[str]:
    """Write ``tensors`` as ``model.safetensors`` or as shards plus an index; returns file names."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / f"{prefix}.safetensors"), metadata=meta)
        return [f"{prefix}.safetensors"]
    names, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        fname = f"{prefix}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / fname), metadata=meta)
        names.append(fname)
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names


def load_tensors(path: Path, prefix: str = "model") -> dict[str, torch.Tensor]:
    """Every tensor of a directory's safetensors (single file or index + shards)."""
    index = path / f"{prefix}.safetensors.index.json"
    files: list[Path]
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index: {err}") from err
        files = [path / f for f in sorted(set(weight_map.values()))]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} holds no .safetensors files.")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.exists():
            raise CheckpointError(f"{f.name} is listed in {index.name} but missing from {path}.")
        try:
            out.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{f} is unreadable or truncated ({err}); re-export it.") from err
    return out


def load_config(path: Path):
    from transformers import AutoConfig

    if not (path / "config.json").exists():
        raise CheckpointError(f"{path} has no config.json; is it a model directory?")
    try:
        return AutoConfig.from_pretrained(str(path))
    except (ValueError, OSError, KeyError) as err:
        raise CheckpointError(f"{path}/config.json cannot be read: {err}") from err


def load_extras(path: Path) -> tuple[Any, Any]:
    """(tokenizer or None, generation config or None) from a directory."""
    from transformers import AutoTokenizer, GenerationConfig

    tok = gen = None
    if any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        try:
            tok = AutoTokenizer.from_pretrained(str(path))
        except (ValueError, OSError) as err:
            raise CheckpointError(f"{path}: tokenizer files cannot be read: {err}") from err
    if (path / "generation_config.json").exists():
        gen = GenerationConfig.from_pretrained(str(path))
    return tok, gen
