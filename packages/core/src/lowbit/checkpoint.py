"""lowbit's own checkpoint: the source of truth, re-exportable to any format.

Directory layout::

    lowbit.json           manifest: format, scheme, recipe, calibration, source, versions,
                          tensor_hash (sha256 of every quantized tensor), float_hash (sha256 of
                          every float tensor), quantized modules
    config.json           the HF config, with no quantization_config
    model.safetensors     float tensors under their HF names, and per quantized linear
                          ``<module>.codes`` (uint8 [N, K]), ``.scales`` (fp16 [N, NG]),
                          ``.zeros`` (uint8 [N, NG]), optional ``.g_idx`` (int32 [K]), ``.bias``
    tokenizer files, generation_config.json
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from .errors import CheckpointError
from .exporter import Exporter
from .hf import (
    DEFAULT_SHARD_BYTES,
    LazyTensors,
    ShardWriter,
    checkpoint_file,
    load_config,
    load_extras,
    load_tensors,
    write_config,
)
from .qmodel import QuantizedModel
from .qweight import QuantizedWeight
from .scheme import QuantScheme

MANIFEST = "lowbit.json"
FORMAT_VERSION = 1
_PARTS = ("codes", "scales", "zeros", "g_idx", "bias")


def package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("lowbit", "lowbit-backend-cpu", "lowbit-backend-cuda", "lowbit-exporters", "torch", "transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


class LowbitCheckpoint(Exporter):
    name = "lowbit"
    description = "lowbit's own checkpoint (safetensors + lowbit.json): unpacked codes, any scheme"

    @classmethod
    def detect(cls, path: Path) -> bool:
        return (path / MANIFEST).is_file()

    def write(self, qmodel: QuantizedModel, out_dir: Path) -> None:
        writer = CheckpointWriter(out_dir)
        writer.add(qmodel.qweights, qmodel.float_tensors)
        writer.finish(qmodel.config, qmodel.scheme, qmodel.manifest, qmodel.tokenizer, qmodel.generation_config)

    def read(self, path: Path, lazy: bool = False, verify: bool = True) -> QuantizedModel:
        """Read and verify: every tensor must match the manifest's hashes (``tensor_hash`` for the
        quantized ones, ``float_hash`` for the rest; checkpoints from before float_hash have only
        the first, and ``inspect`` says so), and no tensor may sit beside a quantized module's parts.

        ``lazy``: tensors are read from the files on access, one at a time (a checkpoint larger than
        memory, e.g. to export it; verifying then reads each once). ``verify=False`` skips the hash
        checks (for a checkpoint this process has just written and hashed)."""
        manifest = self.manifest(path)
        try:
            scheme = QuantScheme.from_dict(manifest["scheme"])
            modules = manifest["quantized_modules"]
            if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
                raise TypeError("quantized_modules is not a list of module names")
            if not isinstance(manifest.get("tensor_hash"), str):
                raise TypeError("tensor_hash is missing")
        except (KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{path}/{MANIFEST} lacks a valid scheme, quantized_modules or tensor_hash "
                                  f"({type(err).__name__}: {err}); the checkpoint is damaged. Re-export it.") from err
        if lazy:
            tensors = LazyTensors(path)
            _check_strays(path, modules, tensors)
            qmodel = _lazy_model(path, manifest, scheme, tensors=tensors)
        else:
            tensors = load_tensors(path)
            _check_strays(path, modules, tensors)
            qweights = {}
            for mod in modules:
                parts = {p: tensors.pop(f"{mod}.{p}", None) for p in _PARTS}
                if any(parts[p] is None for p in ("codes", "scales", "zeros")):
                    raise CheckpointError(f"{path}: tensors of {mod} are missing; the checkpoint is incomplete.")
                try:
                    qweights[mod] = QuantizedWeight(scheme=scheme, **parts)
                except CheckpointError as err:
                    raise CheckpointError(f"{path}: {mod}: {err}") from err
            qmodel = QuantizedModel(load_config(path), scheme, qweights, tensors, manifest=manifest)
        if verify and manifest["tensor_hash"] != qmodel.tensor_hash():
            raise CheckpointError(f"{path}: quantized tensors do not match the manifest's tensor_hash (corrupt).")
        if verify and "float_hash" in manifest and manifest["float_hash"] != qmodel.float_hash():
            raise CheckpointError(f"{path}: float tensors (embeddings, norms, lm_head) do not match the manifest's "
                                  "float_hash: one was altered, added or removed (corrupt). Re-export it.")
        qmodel.tokenizer, qmodel.generation_config = load_extras(path)
        return qmodel

    def manifest(self, path: Path) -> dict:
        """lowbit.json, checked to be a lowbit manifest of a version this lowbit reads."""
        try:
            manifest = json.loads(checkpoint_file(path, MANIFEST).read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{path}/{MANIFEST} is unreadable: {err}") from err
        if not isinstance(manifest, dict):
            raise CheckpointError(f"{path}/{MANIFEST} holds {type(manifest).__name__}, not a JSON object; "
                                  "the checkpoint is damaged.")
        version = manifest.get("format_version", 0)
        if manifest.get("format") != "lowbit" or not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointError(
                f"{path}/{MANIFEST} is format {manifest.get('format')!r} version {version!r}; "
                f"this lowbit reads lowbit version ≤ {FORMAT_VERSION}. Upgrade lowbit."
            )
        return manifest

    def verified(self, path: Path) -> dict:
        floats = ("yes (float_hash)" if "float_hash" in self.manifest(path) else
                  "no: written before float_hash, so only the quantized tensors are checked; re-export to cover all")
        return {"quantized tensors": "yes (tensor_hash)", "float tensors": floats}


class CheckpointWriter:
    """lowbit's checkpoint written piece by piece (a streaming pass adds each layer as it is done),
    one tensor in memory at a time; :meth:`finish` writes config, tokenizer and the manifest, whose
    tensor_hash is computed from the files just written."""

    #: the size at which a new safetensors shard starts
    max_shard_bytes = DEFAULT_SHARD_BYTES

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self._tensors = ShardWriter(self.out_dir, self.max_shard_bytes)
        self._modules: list[str] = []

    def add(self, qweights: Mapping[str, QuantizedWeight], floats: Mapping[str, torch.Tensor]) -> None:
        for name in sorted(floats):
            self._tensors.add(name, floats[name])
        for mod in sorted(qweights):
            for part, t in sorted(qweights[mod].tensors().items()):
                self._tensors.add(f"{mod}.{part}", t)
            self._modules.append(mod)

    def add_tensors(self, tensors: Mapping[str, torch.Tensor], modules: list[str]) -> None:
        """Tensors already under the checkpoint's names (``<module>.codes`` ... and float tensors),
        ``modules`` being the quantized modules among them (a run's per-layer work files)."""
        for name in sorted(tensors):
            self._tensors.add(name, tensors[name])
        self._modules.extend(modules)

    def finish(self, config, scheme: QuantScheme, manifest: dict, tokenizer=None, generation_config=None) -> None:
        self._tensors.close()
        write_config(config, self.out_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(self.out_dir))
        if generation_config is not None:
            generation_config.save_pretrained(str(self.out_dir))
        manifest = {
            **manifest,
            "format": "lowbit",
            "format_version": FORMAT_VERSION,
            "scheme": scheme.to_dict(),
            "quantized_modules": sorted(self._modules),
            "versions": manifest.get("versions") or package_versions(),
        }
        written = _lazy_model(self.out_dir, manifest, scheme, config)
        manifest["tensor_hash"], manifest["float_hash"] = written.tensor_hash(), written.float_hash()
        (self.out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


class _LazyQWeights(Mapping):
    def __init__(self, tensors: LazyTensors, modules: list[str], scheme: QuantScheme, path: Path):
        self._t, self._mods, self._scheme, self._path = tensors, {m: None for m in modules}, scheme, path

    def __getitem__(self, mod: str) -> QuantizedWeight:
        if mod not in self._mods:
            raise KeyError(mod)
        parts = {p: self._t[f"{mod}.{p}"] if f"{mod}.{p}" in self._t else None for p in _PARTS}
        if any(parts[p] is None for p in ("codes", "scales", "zeros")):
            raise CheckpointError(f"{self._path}: tensors of {mod} are missing; the checkpoint is incomplete.")
        return QuantizedWeight(scheme=self._scheme, **parts)

    def __iter__(self) -> Iterator[str]:
        return iter(self._mods)

    def __len__(self) -> int:
        return len(self._mods)


class _LazyFloats(Mapping):
    def __init__(self, tensors: LazyTensors, modules: list[str]):
        quantized = {f"{m}.{p}" for m in modules for p in _PARTS}
        self._t, self._names = tensors, {n: None for n in tensors if n not in quantized}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._t[name]

    def chunked(self, name: str):
        """``name`` as row chunks (:class:`lowbit.hf.TensorChunks`), for writing it without holding it."""
        if name not in self._names:
            raise KeyError(name)
        return self._t.chunked(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _check_strays(path: Path, modules: list[str], tensors) -> None:
    """No tensor may sit beside a quantized module's parts (an added tensor would go unhashed)."""
    mods = set(modules)
    for name in tensors:
        pieces = name.split(".")
        for i in range(1, len(pieces)):
            mod = ".".join(pieces[:i])
            if mod in mods and not (i == len(pieces) - 1 and pieces[-1] in _PARTS):
                raise CheckpointError(f"{path}: unexpected tensor {name} beside the quantized tensors of {mod}; "
                                      "the checkpoint was altered.")


def _lazy_model(path: Path, manifest: dict, scheme: QuantScheme, config=None, tensors=None) -> QuantizedModel:
    tensors = tensors if tensors is not None else LazyTensors(path)
    mods = list(manifest["quantized_modules"])
    return QuantizedModel(config if config is not None else load_config(path), scheme,
                          _LazyQWeights(tensors, mods, scheme, path), _LazyFloats(tensors, mods), manifest=manifest)
