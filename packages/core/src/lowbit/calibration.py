"""Calibration text and samples.

Sources: ``wikitext2`` (the WikiText-2 validation split shipped in this package, CC BY-SA 3.0,
see data/ATTRIBUTION.md), a local ``.txt`` file, a local ``.jsonl`` file (one ``{"text": ...}`` per
line), or ``hf:<dataset>[:<config>[:<split>]]`` through ``datasets`` when online.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

import torch

from .errors import CalibrationError, MissingDependencyError

BUILTIN = {"wikitext2": "wikitext2_valid.txt"}
EVAL_TEXT = "wikitext2_test.txt"


def builtin_text(filename: str) -> str:
    return resources.files("lowbit").joinpath("data", filename).read_text(encoding="utf-8")


def load_text(source: str) -> str:
    """The calibration text of ``source`` (see module doc)."""
    if source in BUILTIN:
        text = builtin_text(BUILTIN[source])
    elif source.startswith("hf:"):
        text = _hf_text(source[3:])
    else:
        path = Path(source)
        if not path.is_file():
            raise CalibrationError(
                f"calibration source {source!r} is neither a built-in ({', '.join(BUILTIN)}) nor a file; "
                "pass --calib wikitext2, a .txt/.jsonl file, or hf:<dataset>."
            )
        if path.suffix == ".jsonl":
            rows = []
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line)["text"])
                except (ValueError, KeyError, TypeError) as err:
                    raise CalibrationError(f"{source}:{i}: each line must be a JSON object with a \"text\" field.") from err
            text = "\n\n".join(rows)
        else:
            text = path.read_text(encoding="utf-8", errors="replace")
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
