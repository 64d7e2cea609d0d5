"""HF-style directory pieces every format shares: config, tokenizer, generation config, and
safetensors files (``format: pt`` metadata, sharded with an index when large). Never pickle."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

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


_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass
class TensorChunks:
    """A tensor written without holding it whole: its dtype and shape, and ``chunks()`` yielding
    consecutive row blocks (along dim 0) that together make it (an embedding of a large vocabulary
    cast to float32 is over 1 GB)."""

    dtype: torch.dtype
    shape: list[int]
    chunks: Callable[[], Iterator[torch.Tensor]]


#: rows per chunk are chosen to keep a chunk near this size
CHUNK_BYTES = 64 * 1024**2


class ShardWriter:
    """Write safetensors shards one tensor at a time, so memory holds one tensor, never a shard.

    Tensors go to a shard in the order they are added; a new shard starts when the next tensor
    would take the current one past ``max_shard_bytes``. A shard's bytes are appended to its file
    as they come, after room left for the header (only known once the shard is complete);
    :meth:`close` writes each header into its file, names the files ``model.safetensors`` or
    ``model-0000N-of-0000M.safetensors`` and writes the index, as transformers does. Each shard is
    written once, in place, so a run's extra disk is never a second copy of a shard (see
    :func:`_put_header`). The files are plain safetensors (``format: pt`` metadata) that
    ``safetensors.safe_open`` validates.

    Each tensor's :func:`tensor_digest` is computed from the bytes as they are written
    (``digests``), so a checkpoint's manifest hashes need no second read of what was written.
    """

    def __init__(self, out_dir: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES, prefix: str = "model"):
        self.out_dir, self.max_shard_bytes, self.prefix = Path(out_dir), max_shard_bytes, prefix
        self._shards: list[dict] = []  # {"data": Path, "header": {name: entry}, "size": int}
        self._fh = None
        self.digests: dict[str, str] = {}
        #: tensor name → file name, complete once :meth:`close` has named the files
        self.weight_map: dict[str, str] = {}

    def add(self, name: str, tensor: torch.Tensor | TensorChunks) -> None:
        if name in self.digests:
            raise ValueError(f"tensor {name} written twice")
        if isinstance(tensor, TensorChunks):
            dtype, shape, chunks = tensor.dtype, list(tensor.shape), tensor.chunks()
        else:
            dtype, shape, chunks = tensor.dtype, list(tensor.shape), iter([tensor])
        if dtype not in _ST_DTYPES:
            raise ValueError(f"tensor {name}: dtype {dtype} has no safetensors code")
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * dtype.itemsize
        if not self._shards or (self._shards[-1]["size"] and self._shards[-1]["size"] + nbytes > self.max_shard_bytes):
            self._new_shard()
        shard = self._shards[-1]
        written = 0
        h = _digest_start(name, dtype, shape)
        for chunk in chunks:
            c = chunk.detach().to("cpu", dtype).contiguous().reshape(-1)
            if c.numel():
                data = c.view(torch.uint8).numpy().data  # no copy of the tensor's bytes
                self._fh.write(data)
                h.update(data)
            written += c.numel() * c.element_size()
        if written != nbytes:
            raise ValueError(f"tensor {name}: {written} bytes written for {dtype} {shape} ({nbytes} expected)")
        shard["header"][name] = {"dtype": _ST_DTYPES[dtype], "shape": shape,
                                 "data_offsets": [shard["size"], shard["size"] + nbytes]}
        shard["size"] += nbytes
        self.digests[name] = h.hexdigest()

    def _new_shard(self) -> None:
        if self._fh is not None:
            self._fh.close()
        data = self.out_dir / f".{self.prefix}-shard{len(self._shards):05d}.data"
        self._fh = open(data, "wb")
        self._fh.write(bytes(HEADER_ROOM))
        self._shards.append({"data": data, "header": {}, "size": 0})

    def close(self, index: bool = True) -> list[str]:
        """Finish every shard (and, with ``index``, the index when there are several); returns the
        file names."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if not self._shards:
            self._new_shard()
            self._fh.close()
            self._fh = None
        n = len(self._shards)
        names = [f"{self.prefix}.safetensors"] if n == 1 else [
            f"{self.prefix}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        for shard, fname in zip(self._shards, names):
            header = {"__metadata__": {"format": "pt"}, **shard["header"]}
            raw = json.dumps(header, separators=(",", ":")).encode()
            _put_header(shard["data"], raw, shard["size"])
            shard["data"].rename(self.out_dir / fname)
        self.weight_map = {k: fname for shard, fname in zip(self._shards, names) for k in shard["header"]}
        if n > 1 and index:
            write_index(self.out_dir / f"{self.prefix}.safetensors.index.json", self.weight_map)
        fault_point("tensors-written")  # tests kill a run here (mid-write)
        return names


#: bytes left for a shard's header ahead of its data (8-byte length + JSON); a larger header moves
#: the data in place, a smaller one in a large shard is padded with spaces, as safetensors allows
HEADER_ROOM = 1 << 20
#: shards up to this size always get an exact header (moving their data costs little)
_EXACT_HEADER_BYTES = 64 << 20
_MOVE_CHUNK = 16 << 20


def _put_header(path: Path, raw: bytes, size: int) -> None:
    """Write a safetensors header into ``path``, whose ``size`` data bytes start at ``HEADER_ROOM``.

    The data moves within the same file when the header does not fill the room exactly (small
    shards, or a header larger than the room), so no second copy of the shard is ever on disk;
    a large shard whose header fits keeps its data where it is and pads the header with spaces
    (the safetensors format allows trailing whitespace in the header)."""
    raw += b" " * (-len(raw) % 8)
    start = 8 + len(raw)
    if start < HEADER_ROOM and size > _EXACT_HEADER_BYTES:
        raw += b" " * (HEADER_ROOM - start)
        start = HEADER_ROOM
    with open(path, "r+b") as f:
        if start < HEADER_ROOM:  # move the data towards the start, first bytes first
            for off in range(0, size, _MOVE_CHUNK):
                f.seek(HEADER_ROOM + off)
                chunk = f.read(min(_MOVE_CHUNK, size - off))
                f.seek(start + off)
                f.write(chunk)
            f.truncate(start + size)
        elif start > HEADER_ROOM:  # move it towards the end, last bytes first
            for end in range(size, 0, -_MOVE_CHUNK):
                off = max(0, end - _MOVE_CHUNK)
                f.seek(HEADER_ROOM + off)
                chunk = f.read(end - off)
                f.seek(start + off)
                f.write(chunk)
        f.seek(0)
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)


def write_index(path: Path, weight_map: Mapping[str, str]) -> None:
    """A safetensors index (``weight_map``: tensor name → file name) as transformers writes it."""
    total = sum(_SafetensorsFile(path.parent / f, CheckpointError).data_size for f in set(weight_map.values()))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _digest_start(name: str, dtype: torch.dtype, shape: list[int]):
    h = hashlib.sha256()
    h.update(f"{name}:{dtype}:{list(shape)}".encode())
    return h


def tensor_digest(name: str, tensor: torch.Tensor | TensorChunks) -> str:
    """sha256 of a tensor under its name: name, dtype and shape, then its bytes (a
    :class:`TensorChunks` is hashed chunk by chunk, never held whole)."""
    h = _digest_start(name, tensor.dtype, list(tensor.shape))
    for c in (tensor.chunks() if isinstance(tensor, TensorChunks) else [tensor]):
        c = c.detach().contiguous().cpu()
        if c.numel():
            h.update(c.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def save_tensors(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], out_dir: Path,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, prefix: str = "model") -> list[str]:
    """Write ``tensors`` as ``model.safetensors`` or as shards plus an index; returns file names.

    A mapping is written in name order; an iterable of ``(name, tensor)`` pairs in its own order,
    one tensor in memory at a time (a lazy mapping's values, or packed tensors made on the fly)."""
    items = ((k, tensors[k]) for k in sorted(tensors)) if isinstance(tensors, Mapping) else tensors
    writer = ShardWriter(out_dir, max_shard_bytes, prefix)
    for name, t in items:
        writer.add(name, t)
    return writer.close()


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


def safetensors_files(path: Path, prefix: str = "model") -> list[Path]:
    """The safetensors files of a directory: those its index names, else ``{prefix}.safetensors``,
    else every ``*.safetensors``; each checked with :func:`checkpoint_file` (present or not)."""
    index = checkpoint_file(path, f"{prefix}.safetensors.index.json")
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index: {type(err).__name__}: {one_line(err)}") from err
        files = [checkpoint_file(path, f) for f in names]
    elif (path / f"{prefix}.safetensors").is_file():
        files = [checkpoint_file(path, f"{prefix}.safetensors")]
    else:
        files = [checkpoint_file(path, f.name) for f in sorted(path.glob("*.safetensors"))]
    if not files:
        raise CheckpointError(f"{path} holds no .safetensors files.")
    return files


_ST_CODES = {v: k for k, v in _ST_DTYPES.items()}
_MAX_HEADER = 100 * 1024**2


class _SafetensorsFile:
    """One safetensors file's header, checked, and its tensors read with plain reads (no memory map:
    pages of a mapped checkpoint would stay in the process's RSS once read, growing with every layer)."""

    def __init__(self, path: Path, error):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
            if not 0 < n <= min(_MAX_HEADER, size - 8):
                raise error(f"{path} is not a safetensors file or is truncated (header size {n}, file {size} bytes); "
                            "re-download or re-export it.")
            try:
                header = json.loads(f.read(n))
            except (ValueError, UnicodeDecodeError) as err:
                raise error(f"{path} has a corrupt safetensors header ({err}); re-download or re-export it.") from None
        if not isinstance(header, dict):
            raise error(f"{path} has a corrupt safetensors header; re-download or re-export it.")
        header.pop("__metadata__", None)
        self.base, self.entries, end = 8 + n, {}, 0
        for name, e in header.items():
            try:
                dtype = _ST_CODES[e["dtype"]]
                shape = [int(d) for d in e["shape"]]
                start, stop = (int(x) for x in e["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise error(f"{path}: tensor {name!r} has a corrupt header entry; re-download or re-export it.") from None
            numel = 1
            for d in shape:
                numel *= d
            if min(shape, default=0) < 0 or not 0 <= start <= stop or stop - start != numel * dtype.itemsize:
                raise error(f"{path}: tensor {name!r} has inconsistent offsets {start}..{stop} for "
                            f"{e['dtype']} {shape}; re-download or re-export it.")
            self.entries[name] = (dtype, shape, start, stop)
            end = max(end, stop)
        self.data_size = end
        if self.base + end != size:
            raise error(f"{path} is truncated or has trailing bytes ({size} bytes, its header describes "
                        f"{self.base + end}); re-download or re-export it.")

    def read(self, name: str) -> torch.Tensor:
        dtype, shape, start, stop = self.entries[name]
        buf = bytearray(stop - start)
        with open(self.path, "rb") as f:
            f.seek(self.base + start)
            f.readinto(buf)
        if not buf:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape)


class LazyTensors(Mapping):
    """Every tensor of a directory's safetensors files, read on access, one at a time: a whole
    checkpoint can be walked without holding it. Opening checks every file's header (a missing or
    truncated shard fails here, before any work)."""

    def __init__(self, path: Path, prefix: str = "model", error=CheckpointError):
        self._where: dict[str, _SafetensorsFile] = {}
        for f in safetensors_files(Path(path), prefix):
            if not f.exists():
                raise error(f"{f.name} is listed in {prefix}.safetensors.index.json but missing from {path}.")
            try:
                sf = _SafetensorsFile(f, error)
            except OSError as err:
                raise error(f"{f} is unreadable ({err}).") from err
            dup = sorted(set(sf.entries) & set(self._where))
            if dup:
                raise error(f"{path}: tensor {dup[0]} is stored in more than one file; the checkpoint is damaged.")
            for k in sf.entries:
                self._where[k] = sf

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._where[name].read(name)

    def __contains__(self, name) -> bool:  # from the headers (Mapping's default would read the tensor)
        return name in self._where

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, name: str) -> list[int]:
        return list(self._where[name].entries[name][1])

    def file(self, name: str) -> Path:
        """The file that holds tensor ``name``."""
        return self._where[name].path

    def dtype(self, name: str) -> torch.dtype:
        return self._where[name].entries[name][0]

    def chunked(self, name: str, dtype: torch.dtype | None = None, chunk_bytes: int = CHUNK_BYTES) -> TensorChunks:
        """``name`` as row blocks of about ``chunk_bytes``, cast to ``dtype`` (default: as stored)."""
        sf = self._where[name]
        stored, shape, start, stop = sf.entries[name]
        dtype = dtype or stored
        if not shape:
            return TensorChunks(dtype, shape, lambda: iter([self[name]]))
        row = (stop - start) // max(shape[0], 1)
        rows = max(1, chunk_bytes // max(row * max(dtype.itemsize // stored.itemsize, 1), 1))

        def chunks() -> Iterator[torch.Tensor]:
            with open(sf.path, "rb") as f:
                for r0 in range(0, shape[0], rows):
                    n = min(rows, shape[0] - r0)
                    buf = bytearray(n * row)
                    f.seek(sf.base + start + r0 * row)
                    f.readinto(buf)
                    t = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
                    yield t.view(stored).reshape([n, *shape[1:]]).to(dtype)

        return TensorChunks(dtype, shape, chunks)


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

