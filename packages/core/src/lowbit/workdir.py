"""The work directory of a quantization run: each finished layer's results and the calibration
activations it hands to the next layer, kept beside the output (``.OUT.work``) so that a killed
run continues with ``--resume`` from its last finished layer instead of starting over.

The work directory holds the lowbit checkpoint under construction: each finished layer is written
once, packed, as a file of that checkpoint, and at the end the checkpoint is completed in place
(:meth:`lowbit.checkpoint.CheckpointWriter.add_file`) and linked into the output, so a run keeps
one copy of its results on disk. Layout::

    state.json                     what the run is (settings fingerprint) and its finished layers'
                                   reports, tensor digests and module widths
    lowbit/layer-00003.safetensors one finished layer as lowbit's checkpoint stores it (packed codes,
                                   scales, zeros, its float tensors)
    inputs.safetensors             the calibration activations entering the first unfinished layer

Each file is written to a temporary name and renamed; ``state.json`` is renamed last, so it only
ever counts layers whose results and successor inputs are on disk. The pass is deterministic
(same machine, same settings), so a resumed run's output is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from .checkpoint import write_layer_file
from .errors import OutputError
from .hf import LazyTensors, save_tensors

STATE = "state.json"
VERSION = 2


def work_dir_for(out: Path) -> Path:
    """``.OUT.work`` beside the directory ``out`` names (``..`` and symlinks resolved, as the output's
    own lock and temporary directory are: ``a/..`` works beside the directory ``a/..`` is)."""
    out = Path(os.path.realpath(out))
    return out.with_name(f".{out.name}.work")


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:24]


class WorkDir:
    """:param path: the directory (created when missing).
    :param settings: everything that decides the result (model, recipe, scheme, calibration ids
        hash, compute dtype); a resume with other settings is refused.
    """

    def __init__(self, path: Path, settings: dict):
        self.path, self.settings = Path(path), settings
        self.key = settings_hash(settings)
        self.rows: list[dict] = []
        #: per finished layer: {"file": name, "digests": {tensor: sha256}, "in_features": {module: K}}
        self.layers: dict[int, dict] = {}

    @property
    def checkpoint(self) -> Path:
        """The lowbit checkpoint under construction."""
        return self.path / "lowbit"

    # -- starting -----------------------------------------------------------------------------
    def start(self, resume: bool) -> int:
        """Prepare the directory; returns the first layer still to do (0 unless resuming)."""
        state = self._read_state() if resume else None
        if state is None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.checkpoint.mkdir(parents=True)
            self._write_state()
            return 0
        if state.get("key") != self.key:
            raise OutputError(f"--resume: {self.path} holds a run made with other settings (model, method, scheme, "
                              "calibration or compute dtype differ); rerun with the same flags, or without --resume "
                              "to start over.")
        self.rows = list(state["rows"])
        self.layers = {int(k): v for k, v in state["layers"].items()}
        return len(self.rows)

    def _read_state(self) -> dict | None:
        try:
            state = json.loads((self.path / STATE).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(state, dict) or state.get("version") != VERSION:
            return None
        return state

    def _write_state(self) -> None:
        tmp = self.path / f".{STATE}.tmp"
        tmp.write_text(json.dumps({"version": VERSION, "key": self.key, "settings": self.settings,
                                   "rows": self.rows, "layers": self.layers}, default=str) + "\n")
        os.replace(tmp, self.path / STATE)

    # -- per layer ------------------------------------------------------------------------------
    def save_layer(self, index: int, qweights: dict, floats: dict, inputs: list[torch.Tensor] | None,
                   row: dict) -> None:
        """Record a finished layer: its results, the next layer's inputs, then the state (the commit)."""
        name = f"layer-{index:05d}.safetensors"
        digests, widths = write_layer_file(self.checkpoint / name, qweights, floats)
        if inputs is not None:
            self._replace("inputs.safetensors", {f"batch.{b}": x for b, x in enumerate(inputs)})
        self.rows.append(row)
        self.layers[index] = {"file": name, "digests": digests, "in_features": widths}
        self._write_state()

    def _replace(self, name: str, tensors: dict) -> None:
        tmp = self.path / f".{name}.tmp"
        tmp.mkdir(exist_ok=True)
        for f in tmp.iterdir():
            f.unlink()
        save_tensors(tensors, tmp, prefix="part")
        os.replace(tmp / "part.safetensors", self.path / name)
        tmp.rmdir()

    def inputs(self) -> list[torch.Tensor]:
        """The activations entering the first unfinished layer."""
        lt = LazyTensors(self.path, prefix="inputs")
        return [lt[f"batch.{b}"] for b in range(len(lt))]

    def clear_finish(self) -> None:
        """Remove what an interrupted finish left in the checkpoint beside the layers' files."""
        keep = {v["file"] for v in self.layers.values()}
        for f in self.checkpoint.iterdir():
            if f.name not in keep:
                shutil.rmtree(f) if f.is_dir() else f.unlink()

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
