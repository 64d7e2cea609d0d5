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
from pathlib import Path

from .errors import CheckpointError
from .exporting import Exporter
from .hf import checkpoint_file, load_config, load_extras, load_tensors, save_tensors, write_config, write_extras
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
            "float_hash": qmodel.float_hash(),
            "quantized_modules": sorted(qmodel.qweights),
            "versions": qmodel.manifest.get("versions") or package_versions(),
        }
        (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    def read(self, path: Path) -> QuantizedModel:
        """Read and verify: every tensor must match the manifest's hashes (``tensor_hash`` for the
        quantized ones, ``float_hash`` for the rest; checkpoints from before float_hash have only
        the first, and ``inspect`` says so), and no tensor may sit beside a quantized module's parts."""
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
        tensors = load_tensors(path)
        qweights = {}
        for mod in modules:
            parts = {p: tensors.pop(f"{mod}.{p}", None) for p in _PARTS}
            if any(parts[p] is None for p in ("codes", "scales", "zeros")):
                raise CheckpointError(f"{path}: tensors of {mod} are missing; the checkpoint is incomplete.")
            stray = sorted(n for n in tensors if n.startswith(mod + "."))
            if stray:
                raise CheckpointError(f"{path}: unexpected tensor {stray[0]} beside the quantized tensors of {mod}; "
                                      "the checkpoint was altered.")
            try:
                qweights[mod] = QuantizedWeight(scheme=scheme, **parts)
            except CheckpointError as err:
                raise CheckpointError(f"{path}: {mod}: {err}") from err
        qmodel = QuantizedModel(load_config(path), scheme, qweights, tensors, manifest=manifest)
        if manifest["tensor_hash"] != qmodel.tensor_hash():
            raise CheckpointError(f"{path}: quantized tensors do not match the manifest's tensor_hash (corrupt).")
        if "float_hash" in manifest and manifest["float_hash"] != qmodel.float_hash():
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
