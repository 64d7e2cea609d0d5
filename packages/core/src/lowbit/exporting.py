"""The Exporter interface (a checkpoint format: writer, reader, detector) and export()."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from .errors import CheckpointError, UnsupportedSchemeError, one_line
from .io import atomic_dir
from .plugins import registry
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


def check_formats(formats: list[str], scheme: QuantScheme, config=None) -> None:
    """Raise one error naming every format that cannot hold ``scheme``."""
    problems = []
    for f in formats:
        reason = registry("exporters").get(f).check(scheme, config)
        if reason:
            problems.append(f"{f}: {reason}")
    if problems:
        ok = [n for n, e in registry("exporters").items() if e.check(scheme, config) is None]
        raise UnsupportedSchemeError(
            f"cannot write {scheme.describe()} as " + "; ".join(problems)
            + f". Formats that can: {', '.join(ok) or 'none'}."
        )


def export(qmodel: QuantizedModel, fmt: str, out: Path | str, overwrite: bool = False) -> Path:
    """Write ``qmodel`` in format ``fmt`` to ``out`` atomically."""
    exporter = registry("exporters").get(fmt)
    check_formats([fmt], qmodel.scheme, qmodel.config)
    with atomic_dir(out, overwrite) as tmp:
        exporter().write(qmodel, tmp)
    return Path(out)


def detect_format(path: Path | str) -> str:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist.")
    for name, cls in registry("exporters").items():
        try:
            if cls.detect(path):
                return name
        except Exception:
            continue
    known = ", ".join(registry("exporters").names())
    raise CheckpointError(
        f"{path} is not a checkpoint lowbit can read (known formats: {known}). "
        "Install lowbit-exporters for autoawq/gptq/xft, or point at a lowbit checkpoint."
    )


def read_checkpoint(path: Path | str, fmt: str | None = None, lazy: bool = False) -> QuantizedModel:
    """Read any checkpoint a registered format recognises; ``lazy``: where the format can (lowbit's
    own), tensors are read on access, so a checkpoint larger than memory can be exported."""
    fmt = fmt or detect_format(path)
    try:
        if lazy and fmt == "lowbit":
            return registry("exporters").get(fmt)().read(Path(path), lazy=True)
        return registry("exporters").get(fmt)().read(Path(path))
    except (CheckpointError, UnsupportedSchemeError):
        raise
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, IndexError, AttributeError, OverflowError) as err:
        # readers parse untrusted files: whatever a damaged one trips is still one line
        raise CheckpointError(f"cannot read {path} as {fmt}: {type(err).__name__}: {one_line(err)}") from err
