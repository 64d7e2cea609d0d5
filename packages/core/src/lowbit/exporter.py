"""The Exporter interface: a checkpoint format (writer, reader, detector).

Formats are found through the registry by :mod:`lowbit.exporting`, one floor up; this module
knows no registry, so a format (lowbit's own included) can subclass it without an import loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from .qmodel import QuantizedModel
from .scheme import QuantScheme


class Exporter:
    """Subclass per on-disk format; register with ``lowbit_register_exporters``.

    ``write`` fills an empty directory (export() makes it atomic); ``read`` returns the
    QuantizedModel a directory holds; ``detect`` says cheaply whether a directory is this format.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    @classmethod
    def check(cls, scheme: QuantScheme, config=None) -> str | None:
        """None if the format can hold ``scheme`` (for the model ``config`` if given), else why not.
        Called before quantization starts."""
        return None

    @classmethod
    def detect(cls, path: Path) -> bool:
        return False

    def inspect(self, path: Path) -> dict:
        """What ``lowbit inspect`` shows: at least ``format``, ``version`` (the layout variant),
        ``scheme`` and ``runtimes`` (runtime name → "yes" or why not). Override to add detail."""
        qmodel = self.read(path)
        return {"format": self.name, "version": None, "scheme": qmodel.scheme.to_dict(),
                "modules": len(qmodel.qweights), "runtimes": {"lowbit": "yes"}}

    def verified(self, path: Path) -> dict:
        """What a read of ``path`` can vouch for (``lowbit inspect`` shows it). Foreign formats carry no
        hash: a read checks structure, shapes, ranges and finite scales, but not the bits themselves."""
        return {"quantized tensors": f"no: {self.name} stores no hash, so flipped bits inside packed weights "
                                     "cannot be detected (shapes, code/zero ranges, g_idx and finite scales are checked)",
                "float tensors": f"no: {self.name} stores no hash for embeddings, norms and lm_head"}

    def write(self, qmodel: QuantizedModel, out_dir: Path) -> None:
        raise NotImplementedError

    def read(self, path: Path) -> QuantizedModel:
        raise NotImplementedError

