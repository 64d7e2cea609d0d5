"""HF-style directory pieces every format shares: config, tokenizer, generation config, and
safetensors files (``format: pt`` metadata, sharded with an index when large). Never pickle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError, one_line
from .io import fault_point

SAFE_INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 4 * 1024**3
#: the tokenizer files transformers may open in a checkpoint directory
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")


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
        _save(shards[0], out_dir / f"{prefix}.safetensors", meta)
        fault_point("tensors-written")  # tests kill a run here (mid-write)
        return [f"{prefix}.safetensors"]
    names, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        fname = f"{prefix}-{i:05d}-of-{len(shards):05d}.safetensors"
        _save(shard, out_dir / fname, meta)
        names.append(fname)
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    fault_point("tensors-written")
    return names


def checkpoint_file(root: Path, name: str) -> Path:
    """``root / name`` once it is known to stay inside the checkpoint directory ``root``.

    Every reader opens a checkpoint's files through this one check: a name from an index, a
    manifest or a config must be relative and free of ``..``, and after following symlinks the file
    must lie under ``root`` (or, for a Hugging Face cache snapshot ``…/snapshots/REV``, under the
    repository's ``blobs``) and, if it exists, be a regular file (never a FIFO or a device, which
    would hang or stream forever). Anything else is a CheckpointError naming the offending entry."""
    root = Path(root)
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise CheckpointError(f"{root}: refusing file name {name!r}: a checkpoint may only name files inside its "
                              "own directory (no absolute paths, no '..'); the checkpoint is damaged or hostile.")
    path = root / name
    real_root = root.resolve()
    allowed = [real_root]
    if real_root.parent.name == "snapshots":  # HF cache: snapshots/REV/x -> ../../blobs/HASH
        allowed.append(real_root.parent.parent / "blobs")
    try:
        real = path.resolve()
    except (OSError, RuntimeError) as err:
        raise CheckpointError(f"{path} cannot be resolved ({err}); the checkpoint is damaged.") from err
    if not any(real == a or a in real.parents for a in allowed):
        raise CheckpointError(f"{root}: {name} points outside the checkpoint directory (to {real}); refusing to "
                              "read it. Copy the file into the checkpoint instead of linking it.")
    if path.exists() and not path.is_file():
        raise CheckpointError(f"{path} is not a regular file; the checkpoint is damaged.")
    return path


def _save(tensors: dict[str, torch.Tensor], path: Path, meta: dict) -> None:
    """save_file, with its write failures (ENOSPC, EIO: SafetensorError) raised as OSError like
    every other write, for atomic_dir to report as one line."""
    try:
        save_file(tensors, str(path), metadata=meta)
    except SafetensorError as err:
        raise OSError(f"{path.name}: {err}") from err


def safetensors_files(path: Path, prefix: str = "model") -> list[Path]:
    """The safetensors files of a directory: those its index names, else every ``*.safetensors``;
    each checked with :func:`checkpoint_file`."""
    index = checkpoint_file(path, f"{prefix}.safetensors.index.json")
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index: {type(err).__name__}: {one_line(err)}") from err
        files = [checkpoint_file(path, f) for f in names]
    else:
        files = [checkpoint_file(path, f.name) for f in sorted(path.glob("*.safetensors"))]
    if not files:
        raise CheckpointError(f"{path} holds no .safetensors files.")
    return files


def load_tensors(path: Path, prefix: str = "model") -> dict[str, torch.Tensor]:
    """Every tensor of a directory's safetensors (single file or index + shards); never pickle."""
    out: dict[str, torch.Tensor] = {}
    for f in safetensors_files(path, prefix):
        if not f.exists():
            raise CheckpointError(f"{f.name} is listed in {prefix}.safetensors.index.json but missing from {path}.")
        try:
            tensors = load_file(str(f))
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{f} is unreadable or truncated ({one_line(err)}); re-export it.") from err
        dup = sorted(set(tensors) & set(out))
        if dup:
            raise CheckpointError(f"{path}: tensor {dup[0]} is stored in more than one file; the checkpoint is damaged.")
        out.update(tensors)
    return out


def load_config(path: Path):
    from transformers import AutoConfig

    if not checkpoint_file(path, "config.json").exists():
        raise CheckpointError(f"{path} has no config.json; is it a model directory?")
    try:  # trust_remote_code=False: an ``auto_map`` in a checkpoint never runs its code
        return AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except Exception as err:  # transformers parses untrusted files: anything it raises is one line
        raise CheckpointError(f"{path}/config.json cannot be read: {one_line(err)}") from err


def load_extras(path: Path) -> tuple[Any, Any]:
    """(tokenizer or None, generation config or None) from a directory."""
    from transformers import AutoTokenizer, GenerationConfig

    tok = gen = None
    for f in TOKENIZER_FILES:
        checkpoint_file(path, f)  # transformers opens these: none may point outside the checkpoint
    if any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        try:
            tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        except Exception as err:  # transformers parses untrusted files: anything it raises is one line
            raise CheckpointError(f"{path}: tokenizer files cannot be read: {one_line(err)}") from err
    if checkpoint_file(path, "generation_config.json").exists():
        try:
            gen = GenerationConfig.from_pretrained(str(path))
        except Exception as err:  # transformers parses untrusted files: anything it raises is one line
            raise CheckpointError(f"{path}/generation_config.json cannot be read: {one_line(err)}") from err
    return tok, gen

