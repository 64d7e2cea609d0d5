"""Calibration text and samples.

Sources: ``wikitext2`` (the WikiText-2 validation split shipped in this package, CC BY-SA 3.0,
see data/ATTRIBUTION.md), a local ``.txt`` file, a local ``.jsonl`` file (one ``{"text": ...}`` per
line), or ``hf:<dataset>[:<config>[:<split>]]`` through ``datasets`` when online.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from importlib import resources
from pathlib import Path

import torch

from .errors import CalibrationError, LowbitError, MissingDependencyError
from .limits import check_fits

BUILTIN = {"wikitext2": "wikitext2_valid.txt"}
EVAL_TEXT = "wikitext2_test.txt"


def builtin_text(filename: str) -> str:
    return resources.files("lowbit").joinpath("data", filename).read_text(encoding="utf-8")


#: bytes read first to tell text from binary before a large file is read whole
_SNIFF = 1 << 16


def read_text_file(path: str | Path, flag: str, error: type[LowbitError] = LowbitError) -> str:
    """The text of the file the user named with ``flag`` (``--calib``, ``--text``), refused with one
    line unless it is a regular, non-empty UTF-8 text file that fits in memory: a directory, a FIFO or
    a device (``/dev/zero`` would never end), a binary file (NUL bytes, or bytes that are not UTF-8) and
    an empty or blank file each say so. Every command reads text files through this."""
    shown = f"{flag} {path}"
    try:
        st = os.stat(path)  # follows symlinks: the file a link names is what is read
    except FileNotFoundError:
        raise error(f"{shown}: no such file; give the path of a UTF-8 text file.") from None
    except (OSError, ValueError) as err:
        raise error(f"{shown}: cannot be read ({getattr(err, 'strerror', None) or err}); give a readable text file.") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{shown} is a directory; give a UTF-8 text file.")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{shown} is not a regular file (a FIFO, socket or device); give a UTF-8 text file.")
    if st.st_size == 0:
        raise error(f"{shown} is empty; give a file with text in it.")
    check_fits(2 * st.st_size, f"{shown} ({st.st_size:,} bytes, read and decoded)",
               "Give a smaller text file.", error)
    try:
        with open(path, "rb") as f:
            head = f.read(_SNIFF)
            if b"\0" in head:
                raise error(f"{shown} is binary (it holds NUL bytes), not text; give a UTF-8 text file.")
            data = head + f.read()
    except OSError as err:
        raise error(f"{shown}: cannot be read ({err.strerror or err}); give a readable text file.") from None
    if b"\0" in data:
        raise error(f"{shown} is binary (it holds NUL bytes), not text; give a UTF-8 text file.")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{shown} is not UTF-8 text (byte {err.start} cannot be decoded); convert it to UTF-8.") from None
    if not text.strip():
        raise error(f"{shown} is empty (only whitespace); give a file with text in it.")
    return text


def load_text(source: str) -> str:
    """The calibration text of ``source`` (see module doc)."""
    if source in BUILTIN:
        text = builtin_text(BUILTIN[source])
    elif source.startswith("hf:"):
        text = _hf_text(source[3:])
    else:
        path = Path(source)
        if not os.path.lexists(path):
            raise CalibrationError(
                f"calibration source {source!r} is neither a built-in ({', '.join(BUILTIN)}) nor a file; "
                "pass --calib wikitext2, a .txt/.jsonl file, or hf:<dataset>."
            )
        raw = read_text_file(path, "--calib", CalibrationError)
        if path.suffix == ".jsonl":
            rows = []
            for i, line in enumerate(raw.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line)["text"])
                except (ValueError, KeyError, TypeError) as err:
                    raise CalibrationError(f"{source}:{i}: each line must be a JSON object with a \"text\" field.") from err
            text = "\n\n".join(rows)
        else:
            text = raw
    if not text.strip():
        raise CalibrationError(f"calibration text from {source!r} is empty; give a file with text in it.")
    return text


def _hf_text(spec: str) -> str:
    try:
        import datasets
    except ImportError as err:
        raise MissingDependencyError("hf: calibration sources need datasets; run: pip install 'lowbit[datasets]'") from err
    name, config, split = (spec.split(":") + [None, None])[:3]
    try:
        ds = datasets.load_dataset(name, config, split=split or "train")
    except Exception as err:  # datasets raises many types for offline / unknown names
        raise CalibrationError(f"cannot load dataset {spec!r}: {str(err).splitlines()[0]}") from err
    return "\n\n".join(str(t) for t in ds["text"])


def samples(tokenizer, text: str, nsamples: int, seqlen: int) -> torch.Tensor:
    """``[nsamples, seqlen]`` token ids: windows spread evenly over the tokenized text.

    Deterministic (no random generator): window i starts at ``i * (T - seqlen) // (nsamples - 1)``.
    """
    if nsamples < 1 or seqlen < 1:
        raise CalibrationError(f"need nsamples ≥ 1 and seqlen ≥ 1, got {nsamples} × {seqlen}.")
    check_fits(nsamples * seqlen * 8, f"--nsamples {nsamples} × --seqlen {seqlen} calibration token ids",
               "Pass a smaller --nsamples or --seqlen.", CalibrationError)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    total = ids.numel()
    if total < seqlen:
        raise CalibrationError(
            f"calibration text has {total} tokens, shorter than one sample of {seqlen}; "
            "give more text or a smaller --seqlen."
        )
    span = total - seqlen
    starts = [0] if nsamples == 1 else [i * span // (nsamples - 1) for i in range(nsamples)]
    return torch.stack([ids[s : s + seqlen] for s in starts])


def fingerprint(source: str, ids: torch.Tensor) -> dict:
    """What the manifest records about calibration (the sha256 covers the exact token ids)."""
    h = hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()
    return {"source": source, "nsamples": ids.shape[0], "seqlen": ids.shape[1], "sha256": h}
