"""lowbit's own checkpoint: the source of truth, re-exportable to any format.

Directory layout::

    lowbit.json           manifest: format, scheme, recipe, calibration, source, versions,
                          tensor_hash (sha256 of every quantized tensor), quantized modules
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
from .exporting import Exporter
from .hf import DEFAULT_SHARD_BYTES, LazyTensors, ShardWriter, load_config, load_extras, load_tensors, write_config
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
        """The checkpoint at ``path``, checked against the manifest's tensor_hash (``verify``). ``lazy``:
        tensors are read from the files on access, one at a time (for walking a checkpoint larger
        than memory, e.g. to export it; the hash check then reads them once more)."""
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{path}/{MANIFEST} is unreadable: {err}") from err
        if manifest.get("format") != "lowbit" or manifest.get("format_version", 0) > FORMAT_VERSION:
            raise CheckpointError(
                f"{path}/{MANIFEST} is format {manifest.get('format')!r} version {manifest.get('format_version')}; "
                f"this lowbit reads lowbit version ≤ {FORMAT_VERSION}. Upgrade lowbit."
            )
        scheme = QuantScheme.from_dict(manifest["scheme"])
        if lazy:
            qmodel = _lazy_model(path, manifest, scheme)
            qmodel.tokenizer, qmodel.generation_config = load_extras(path)
            if verify and manifest.get("tensor_hash") and manifest["tensor_hash"] != qmodel.tensor_hash():
                raise CheckpointError(f"{path}: quantized tensors do not match the manifest's tensor_hash (corrupt).")
            return qmodel
        tensors = load_tensors(path)
        qweights = {}
        for mod in manifest["quantized_modules"]:
            parts = {p: tensors.pop(f"{mod}.{p}", None) for p in _PARTS}
            if any(parts[p] is None for p in ("codes", "scales", "zeros")):
                raise CheckpointError(f"{path}: tensors of {mod} are missing; the checkpoint is incomplete.")
            qweights[mod] = QuantizedWeight(scheme=scheme, **parts)
        qmodel = QuantizedModel(load_config(path), scheme, qweights, tensors, manifest=manifest)
        qmodel.tokenizer, qmodel.generation_config = load_extras(path)
        if manifest.get("tensor_hash") and manifest["tensor_hash"] != qmodel.tensor_hash():
            raise CheckpointError(f"{path}: quantized tensors do not match the manifest's tensor_hash (corrupt).")
        return qmodel


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
        manifest["tensor_hash"] = _lazy_model(self.out_dir, manifest, scheme, config).tensor_hash()
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


def _lazy_model(path: Path, manifest: dict, scheme: QuantScheme, config=None) -> QuantizedModel:
    tensors = LazyTensors(path)
    mods = list(manifest["quantized_modules"])
    return QuantizedModel(config if config is not None else load_config(path), scheme,
                          _LazyQWeights(tensors, mods, scheme, path), _LazyFloats(tensors, mods), manifest=manifest)
