"""lowbit's own checkpoint: the source of truth, re-exportable to any format.

Directory layout (format version 2)::

    lowbit.json           manifest: format, scheme, recipe, calibration, source, versions,
                          quantized modules and their input widths, codes_layout, tensor_hash and
                          float_hash (below)
    config.json           the HF config, with no quantization_config
    *.safetensors         float tensors under their HF names, and per quantized linear
                          ``<module>.qcodes`` (int32, bit-packed codes: :data:`CODES_LAYOUT`),
                          ``.scales`` (fp16 [N, NG]), ``.zeros`` (uint8 [N, NG]), optional
                          ``.g_idx`` (int32 [K]) and ``.bias``; one file, or several named by
                          ``model.safetensors.index.json`` (a streamed run writes one file per layer)
    tokenizer files, generation_config.json

``tensor_hash`` covers everything that decides how the codes decode: the scheme, the codes layout,
each module's input width, and every quantized tensor; ``float_hash`` covers every other tensor.
Both are sha256 over the sorted ``name digest`` lines of :func:`lowbit.hf.tensor_digest`, so a
writer computes them from the bytes as it writes them (layer by layer, in any order).

Version 1 (read, no longer written) stored ``<module>.codes`` unpacked (uint8 [N, K]) and hashed
the tensors alone (:meth:`QuantizedModel.tensor_hash`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError
from .exporter import Exporter
from .hf import (
    DEFAULT_SHARD_BYTES,
    SAFE_INDEX,
    LazyTensors,
    ShardWriter,
    TensorChunks,
    checkpoint_file,
    load_config,
    load_extras,
    load_tensors,
    tensor_digest,
    write_config,
    write_index,
)
from .packing import block, pack_bits, unpack_bits
from .qmodel import QuantizedModel
from .qweight import QuantizedWeight, check_parts
from .scheme import QuantScheme

MANIFEST = "lowbit.json"
FORMAT_VERSION = 2
#: how version 2 stores codes; named in the manifest and covered by tensor_hash
CODES_LAYOUT = ("qcodes int32 [N, ceil(K/B)*W]: each row's codes zero-padded to whole blocks of B values and "
                "packed LSB-first into W words (lowbit.packing.pack_bits; B/W = 16/1, 32/3, 8/1, 4/1 for 2/3/4/8 bits)")
_PARTS = ("qcodes", "scales", "zeros", "g_idx", "bias")
_PARTS_V1 = ("codes", "scales", "zeros", "g_idx", "bias")
#: rows packed at a time (bounds pack_bits' 64-bit temporaries to a slice of the matrix)
_PACK_ROWS = 1024


def package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("lowbit", "lowbit-backend-cpu", "lowbit-backend-cuda", "lowbit-exporters", "torch", "transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _by_rows(fn, t: torch.Tensor, *args) -> torch.Tensor:
    """``fn`` over blocks of :data:`_PACK_ROWS` rows of ``t``, concatenated (bounds the bit packing's
    64-bit temporaries to a slice of the matrix)."""
    return torch.cat([fn(t[r:r + _PACK_ROWS], *args) for r in range(0, max(t.shape[0], 1), _PACK_ROWS)])


def stored_parts(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The tensors version 2 stores for one quantized linear (short names: ``qcodes``, ``scales``...)."""
    nv, _ = block(qw.scheme.bits)
    codes = torch.nn.functional.pad(qw.codes, (0, -qw.in_features % nv))
    out = {"qcodes": _by_rows(pack_bits, codes, qw.scheme.bits)}
    out.update((k, v) for k, v in qw.tensors().items() if k != "codes")
    return out


def from_parts(parts: Mapping[str, torch.Tensor | None], scheme: QuantScheme, in_features: int) -> QuantizedWeight:
    """Inverse of :func:`stored_parts` (raises CheckpointError on a shape that cannot hold the codes)."""
    q = parts["qcodes"]
    nv, nw = block(scheme.bits)
    if q.dim() != 2 or q.dtype != torch.int32 or q.shape[1] != -(-in_features // nv) * nw:
        raise CheckpointError(f"qcodes {q.dtype} {list(q.shape)} cannot hold {in_features} {scheme.bits}-bit codes per "
                              f"row ({CODES_LAYOUT})")
    codes = _by_rows(unpack_bits, q, scheme.bits, in_features)
    return QuantizedWeight(codes=codes, scheme=scheme, **{k: parts.get(k) for k in _PARTS[1:]})


def combined_hash(digests: Mapping[str, str], header: str = "") -> str:
    """sha256 of ``header`` and the sorted ``name digest`` lines."""
    h = hashlib.sha256(header.encode())
    for name in sorted(digests):
        h.update(f"\n{name} {digests[name]}".encode())
    return h.hexdigest()


def quantized_header(scheme: QuantScheme, in_features: Mapping[str, int]) -> str:
    """What tensor_hash covers beside the tensors: scheme, codes layout and every module's input width."""
    return json.dumps({"scheme": scheme.to_dict(), "codes_layout": CODES_LAYOUT, "in_features": dict(in_features)},
                      sort_keys=True)


def _quantized_names(modules, parts=_PARTS) -> set[str]:
    return {f"{m}.{p}" for m in modules for p in parts}


class LowbitCheckpoint(Exporter):
    name = "lowbit"
    description = "lowbit's own checkpoint (safetensors + lowbit.json): bit-packed codes, any scheme"

    @classmethod
    def detect(cls, path: Path) -> bool:
        return (path / MANIFEST).is_file()

    def write(self, qmodel: QuantizedModel, out_dir: Path) -> None:
        writer = CheckpointWriter(out_dir)
        writer.add(qmodel.qweights, qmodel.float_tensors)
        writer.finish(qmodel.config, qmodel.scheme, qmodel.manifest, qmodel.tokenizer, qmodel.generation_config)

    def read(self, path: Path, lazy: bool = False, verify: bool = True) -> QuantizedModel:
        """Read and verify: every tensor must match the manifest's hashes (``tensor_hash`` for the
        quantized ones with what decides their decoding, ``float_hash`` for the rest; version-1
        checkpoints from before float_hash have only the first, and ``inspect`` says so), and no
        tensor may sit beside a quantized module's parts.

        ``lazy``: tensors are read from the files on access, one at a time (a checkpoint larger than
        memory, e.g. to export it; verifying then reads each once). ``verify=False`` skips the hash
        checks (for a checkpoint this process has just written and hashed)."""
        manifest = self.manifest(path)
        version = manifest.get("format_version", 0)
        parts = _PARTS if version >= 2 else _PARTS_V1
        try:
            scheme = QuantScheme.from_dict(manifest["scheme"])
            modules = manifest["quantized_modules"]
            if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
                raise TypeError("quantized_modules is not a list of module names")
            if not isinstance(manifest.get("tensor_hash"), str):
                raise TypeError("tensor_hash is missing")
            widths = manifest["in_features"] if version >= 2 else {}
            if version >= 2 and (not isinstance(widths, dict) or set(widths) != set(modules)
                                 or not all(isinstance(k, int) and k > 0 for k in widths.values())):
                raise TypeError("in_features does not give a positive width for every quantized module")
        except (KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{path}/{MANIFEST} lacks a valid scheme, quantized_modules, in_features or "
                                  f"tensor_hash ({type(err).__name__}: {err}); the checkpoint is damaged. "
                                  "Re-export it.") from err
        tensors = LazyTensors(path) if lazy else load_tensors(path)
        _check_strays(path, modules, tensors, parts)
        mismatch = _stored_mismatch(path, manifest, scheme, tensors) if verify and version >= 2 else None
        if lazy:
            qmodel = _lazy_model(path, manifest, scheme, tensors=tensors)
        else:
            qweights = {}
            for mod in modules:
                found = {p: tensors.pop(f"{mod}.{p}", None) for p in parts}
                if any(found[p] is None for p in parts[:3]):
                    raise CheckpointError(f"{path}: tensors of {mod} are missing; the checkpoint is incomplete.")
                qweights[mod] = _build(path, mod, found, scheme, widths.get(mod))
            qmodel = QuantizedModel(load_config(path), scheme, qweights, tensors, manifest=manifest)
        if mismatch:  # after building, which names a weight that cannot decode (NaN scales...) first
            raise CheckpointError(mismatch)
        if verify and version < 2:
            if manifest["tensor_hash"] != qmodel.tensor_hash():
                raise CheckpointError(f"{path}: quantized tensors do not match the manifest's tensor_hash (corrupt).")
            if "float_hash" in manifest and manifest["float_hash"] != qmodel.float_hash():
                raise CheckpointError(_FLOAT_MISMATCH.format(path=path))
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
        manifest = self.manifest(path)
        if manifest.get("format_version", 0) >= 2:
            return {"quantized tensors": "yes (tensor_hash, with scheme, codes layout and shapes)",
                    "float tensors": "yes (float_hash)"}
        floats = ("yes (float_hash)" if "float_hash" in manifest else
                  "no: written before float_hash, so only the quantized tensors are checked; re-export to cover all")
        return {"quantized tensors": "yes (tensor_hash; version 1: tensors only, not the scheme)",
                "float tensors": floats}


_FLOAT_MISMATCH = ("{path}: float tensors (embeddings, norms, lm_head) do not match the manifest's float_hash: one "
                   "was altered, added or removed (corrupt). Re-export it.")


def _build(path: Path, mod: str, found: Mapping, scheme: QuantScheme, in_features: int | None) -> QuantizedWeight:
    try:
        if in_features is None:  # version 1: unpacked codes
            return QuantizedWeight(scheme=scheme, **found)
        return from_parts(found, scheme, in_features)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {mod}: {err}") from err


def _stored_mismatch(path: Path, manifest: dict, scheme: QuantScheme, tensors: Mapping) -> str | None:
    """Version 2: recompute both hashes from the stored tensors (one read of each; floats in row
    chunks); what does not match the manifest, or None."""
    modules = manifest["quantized_modules"]
    quantized = _quantized_names(modules)
    chunked = getattr(tensors, "chunked", None)
    qd, fd = {}, {}
    for name in tensors:
        value = chunked(name) if chunked and name not in quantized else tensors[name]
        (qd if name in quantized else fd)[name] = tensor_digest(name, value)
    if manifest["tensor_hash"] != combined_hash(qd, quantized_header(scheme, manifest["in_features"])):
        return (f"{path}: quantized tensors, or the scheme, layout or shapes that decode them, do not match the "
                "manifest's tensor_hash (corrupt or edited). Re-export it.")
    if manifest.get("float_hash") != combined_hash(fd):
        return _FLOAT_MISMATCH.format(path=path)
    return None


class CheckpointWriter:
    """lowbit's checkpoint written piece by piece, one tensor in memory at a time: :meth:`add` writes
    quantized linears (packed) and float tensors; :meth:`add_file` takes a safetensors file already
    written into the directory (a streamed run's finished layer, see :mod:`lowbit.workdir`) with its
    digests. :meth:`finish` writes the index, config, tokenizer and the manifest, whose hashes come
    from the digests taken while writing (nothing is read back)."""

    #: the size at which a new safetensors shard starts
    max_shard_bytes = DEFAULT_SHARD_BYTES

    def __init__(self, out_dir: Path, prefix: str = "model"):
        self.out_dir = Path(out_dir)
        self._tensors = ShardWriter(self.out_dir, self.max_shard_bytes, prefix)
        self._widths: dict[str, int] = {}
        self._files: dict[str, str] = {}  # tensor → file, of the files added whole
        self._digests: dict[str, str] = {}

    def add(self, qweights: Mapping[str, QuantizedWeight], floats: Mapping[str, torch.Tensor | TensorChunks]) -> None:
        for name in sorted(floats):
            self._tensors.add(name, floats[name])
        for mod in sorted(qweights):
            for part, t in sorted(stored_parts(qweights[mod]).items()):
                self._tensors.add(f"{mod}.{part}", t)
            self._widths[mod] = qweights[mod].in_features

    def add_file(self, name: str, digests: Mapping[str, str], in_features: Mapping[str, int]) -> None:
        """``out_dir/name``, written by :func:`write_layer_file`: ``digests`` of its tensors and the
        input width of each quantized module in it."""
        for t in digests:
            self._files[t] = name
        self._digests.update(digests)
        self._widths.update(in_features)

    def finish(self, config, scheme: QuantScheme, manifest: dict, tokenizer=None, generation_config=None) -> None:
        names = self._tensors.close(index=False)
        weight_map = {**self._files, **self._tensors.weight_map}
        digests = {**self._digests, **self._tensors.digests}
        if len(set(weight_map.values())) > 1 or names != ["model.safetensors"]:
            write_index(self.out_dir / SAFE_INDEX, weight_map)
        write_config(config, self.out_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(self.out_dir))
        if generation_config is not None:
            generation_config.save_pretrained(str(self.out_dir))
        modules = sorted(self._widths)
        quantized = _quantized_names(modules)
        manifest = {
            **manifest,
            "format": "lowbit",
            "format_version": FORMAT_VERSION,
            "scheme": scheme.to_dict(),
            "codes_layout": CODES_LAYOUT,
            "quantized_modules": modules,
            "in_features": {m: self._widths[m] for m in modules},
            "versions": manifest.get("versions") or package_versions(),
            "tensor_hash": combined_hash({k: v for k, v in digests.items() if k in quantized},
                                         quantized_header(scheme, self._widths)),
            "float_hash": combined_hash({k: v for k, v in digests.items() if k not in quantized}),
        }
        (self.out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def write_layer_file(path: Path, qweights: Mapping[str, QuantizedWeight], floats: Mapping[str, torch.Tensor]
                     ) -> tuple[dict[str, str], dict[str, int]]:
    """One safetensors file at ``path`` (written beside it, then renamed) holding ``qweights`` packed
    as version 2 stores them and ``floats``; returns (digest of each tensor, input width of each
    quantized module) for :meth:`CheckpointWriter.add_file`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.mkdir(exist_ok=True)
    for f in tmp.iterdir():
        f.unlink()
    writer = ShardWriter(tmp, max_shard_bytes=1 << 62, prefix="part")
    for name in sorted(floats):
        writer.add(name, floats[name])
    for mod in sorted(qweights):
        for part, t in sorted(stored_parts(qweights[mod]).items()):
            writer.add(f"{mod}.{part}", t)
    writer.close()
    os.replace(tmp / "part.safetensors", path)
    tmp.rmdir()
    return writer.digests, {m: qw.in_features for m, qw in qweights.items()}


#: packed code bytes read per block by :meth:`StoredWeight.code_rows` (its unpacking's 64-bit temporaries are
#: 16x that: a few MB, whatever the matrix)
_ROWS_BYTES = 256 * 1024


@dataclass
class StoredWeight:
    """One quantized linear of a lazily read checkpoint with its codes left on disk: every other part read
    and checked as :class:`QuantizedWeight` checks them, and :meth:`code_rows` giving the codes a block of
    rows at a time, so a consumer with its own layout (the CPU backend's native decoder) converts them
    without the whole matrix ever unpacked."""

    scheme: QuantScheme
    in_features: int
    out_features: int
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor | None
    bias: torch.Tensor | None
    code_rows: Callable[[], Iterator[torch.Tensor]]  # uint8 [rows, K] codes, consecutive row blocks

    def has_trivial_g_idx(self) -> bool:
        return QuantizedWeight.has_trivial_g_idx(self)  # reads only g_idx, scheme and in_features


class _LazyQWeights(Mapping):
    def __init__(self, tensors: LazyTensors, manifest: dict, scheme: QuantScheme, path: Path):
        self._t, self._scheme, self._path = tensors, scheme, path
        self._mods = {m: None for m in manifest["quantized_modules"]}
        self._widths = manifest.get("in_features") if manifest.get("format_version", 0) >= 2 else {}
        self._parts = _PARTS if self._widths else _PARTS_V1

    def _found(self, mod: str, parts) -> dict:
        if mod not in self._mods:
            raise KeyError(mod)
        found = {p: self._t[f"{mod}.{p}"] if f"{mod}.{p}" in self._t else None for p in parts}
        if any(f"{mod}.{p}" not in self._t for p in self._parts[:3]):
            raise CheckpointError(f"{self._path}: tensors of {mod} are missing; the checkpoint is incomplete.")
        return found

    def __getitem__(self, mod: str) -> QuantizedWeight:
        return _build(self._path, mod, self._found(mod, self._parts), self._scheme, self._widths.get(mod))

    def shape(self, mod: str) -> list[int]:
        """``[out_features, in_features]`` of ``mod`` from the headers and manifest; nothing is read."""
        if mod not in self._mods:
            raise KeyError(mod)
        codes = f"{mod}.{self._parts[0]}"
        if codes not in self._t:
            raise CheckpointError(f"{self._path}: tensors of {mod} are missing; the checkpoint is incomplete.")
        rows, cols = (self._t.shape(codes) + [0, 0])[:2]
        return [rows, self._widths.get(mod, cols)]

    def stored(self, mod: str) -> StoredWeight:
        """``mod`` with its codes left on disk (:class:`StoredWeight`)."""
        found = self._found(mod, self._parts[1:])
        name = f"{mod}.{self._parts[0]}"
        n, k = self.shape(mod)
        dtype = self._t.dtype(name)
        if self._widths:  # version 2: packed words, checked as from_parts checks them
            nv, nw = block(self._scheme.bits)
            if len(self._t.shape(name)) != 2 or dtype != torch.int32 or self._t.shape(name)[1] != -(-k // nv) * nw:
                raise CheckpointError(f"{self._path}: {mod}: qcodes {dtype} {self._t.shape(name)} cannot hold {k} "
                                      f"{self._scheme.bits}-bit codes per row ({CODES_LAYOUT})")
        try:  # every part but the codes checked as every read checks them (codes: as they are read, below)
            check_parts(n, k, found["scales"], found["zeros"], self._scheme, found["g_idx"], found["bias"])
        except CheckpointError as err:
            raise CheckpointError(f"{self._path}: {mod}: {err}") from err

        def code_rows() -> Iterator[torch.Tensor]:
            for block_ in self._t.chunked(name, chunk_bytes=_ROWS_BYTES).chunks():
                codes = unpack_bits(block_, self._scheme.bits, k) if self._widths else block_
                if codes.numel() and (codes.dtype != torch.uint8 or int(codes.max()) > self._scheme.maxq):
                    raise CheckpointError(f"{self._path}: {mod}: codes exceed {self._scheme.maxq} for "
                                          f"{self._scheme.bits}-bit")
                yield codes

        return StoredWeight(self._scheme, k, n, found["scales"], found["zeros"], found["g_idx"], found["bias"],
                            code_rows)

    def __iter__(self) -> Iterator[str]:
        return iter(self._mods)

    def __len__(self) -> int:
        return len(self._mods)


class _LazyFloats(Mapping):
    def __init__(self, tensors: LazyTensors, modules: list[str]):
        quantized = _quantized_names(modules) | _quantized_names(modules, _PARTS_V1)
        self._t, self._names = tensors, {n: None for n in tensors if n not in quantized}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._t[name]

    def __contains__(self, name) -> bool:  # from the headers (Mapping's default would read the tensor)
        return name in self._names

    def shape(self, name: str) -> list[int]:
        if name not in self._names:
            raise KeyError(name)
        return self._t.shape(name)

    def chunked(self, name: str, **kw):
        """``name`` as row chunks (:class:`lowbit.hf.TensorChunks`; ``kw``: its ``dtype``, ``chunk_bytes``), for
        writing or converting it without holding it."""
        if name not in self._names:
            raise KeyError(name)
        return self._t.chunked(name, **kw)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _check_strays(path: Path, modules: list[str], tensors, parts=_PARTS) -> None:
    """No tensor may sit beside a quantized module's parts (an added tensor would go unhashed)."""
    mods = set(modules)
    for name in tensors:
        pieces = name.split(".")
        for i in range(1, len(pieces)):
            mod = ".".join(pieces[:i])
            if mod in mods and not (i == len(pieces) - 1 and pieces[-1] in parts):
                raise CheckpointError(f"{path}: unexpected tensor {name} beside the quantized tensors of {mod}; "
                                      "the checkpoint was altered.")


def _lazy_model(path: Path, manifest: dict, scheme: QuantScheme, config=None, tensors=None) -> QuantizedModel:
    tensors = tensors if tensors is not None else LazyTensors(path)
    return QuantizedModel(config if config is not None else load_config(path), scheme,
                          _LazyQWeights(tensors, manifest, scheme, path),
                          _LazyFloats(tensors, list(manifest["quantized_modules"])), manifest=manifest)
