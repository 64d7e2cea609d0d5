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
from pathlib import Path

from .errors import CheckpointError
from .exporting import Exporter
from .hf import load_config, load_extras, load_tensors, save_tensors, write_config, write_extras
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
        tensors = dict(qmodel.float_tensors)
        for mod, qw in qmodel.qweights.items():
            for part, t in qw.tensors().items():
                tensors[f"{mod}.{part}"] = t
        save_tensors(tensors, out_dir)
        write_config(qmodel.config, out_dir)
        write_extras(qmodel, out_dir)
        manifest = {
            **qmodel.manifest,
            "format": "lowbit",
            "format_version": FORMAT_VERSION,
            "scheme": qmodel.scheme.to_dict(),
            "tensor_hash": qmodel.tensor_hash(),
            "quantized_modules": sorted(qmodel.qweights),
            "versions": qmodel.manifest.get("versions") or package_versions(),
        }
        (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    def read(self, path: Path) -> QuantizedModel:
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
