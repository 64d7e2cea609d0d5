"""Writing and reading checkpoints through the registered formats: export(), read_checkpoint(),
detect_format(), check_formats().

Each function takes the registries it uses (``exporters``, ``architectures``); left out, they are
the installed plugins' (:func:`lowbit.registry`). The :class:`Exporter` interface itself lives in
:mod:`lowbit.exporter`, below the plugin manager.
"""

from __future__ import annotations

from pathlib import Path

from .errors import CheckpointError, UnsupportedSchemeError, one_line
from .exporter import Exporter
from .io import atomic_dir
from .models import adapter_or_none
from .plugins import registry
from .qmodel import QuantizedModel
from .registry import Registry
from .scheme import QuantScheme

__all__ = ["Exporter", "check_formats", "detect_format", "export", "read_checkpoint", "with_adapter"]


def with_adapter(qmodel: QuantizedModel, architectures: Registry | None = None) -> QuantizedModel:
    """``qmodel`` carrying its architecture adapter: the one it has, else the one ``architectures``
    holds for its config (None when none serves its model type). Returns ``qmodel``."""
    if qmodel.adapter is None:
        architectures = registry("architectures") if architectures is None else architectures
        qmodel.adapter = adapter_or_none(qmodel.config, architectures)
    return qmodel


def check_formats(formats: list[str], scheme: QuantScheme, config=None, exporters: Registry | None = None) -> None:
    """Raise one error naming every format that cannot hold ``scheme``."""
    exporters = registry("exporters") if exporters is None else exporters
    problems = []
    for f in formats:
        reason = exporters.get(f).check(scheme, config)
        if reason:
            problems.append(f"{f}: {reason}")
    if problems:
        ok = [n for n, e in exporters.items() if e.check(scheme, config) is None]
        raise UnsupportedSchemeError(
            f"cannot write {scheme.describe()} as " + "; ".join(problems)
            + f". Formats that can: {', '.join(ok) or 'none'}."
        )


def export(qmodel: QuantizedModel, fmt: str, out: Path | str, overwrite: bool = False,
           exporters: Registry | None = None, architectures: Registry | None = None) -> Path:
    """Write ``qmodel`` in format ``fmt`` to ``out`` atomically (a model without an adapter gets the
    one ``architectures`` holds for its config first: formats ask it for the family's names)."""
    exporters = registry("exporters") if exporters is None else exporters
    exporter = exporters.get(fmt)
    check_formats([fmt], qmodel.scheme, qmodel.config, exporters)
    with_adapter(qmodel, architectures)
    with atomic_dir(out, overwrite) as tmp:
        exporter().write(qmodel, tmp)
    return Path(out)


def detect_format(path: Path | str, exporters: Registry | None = None) -> str:
    """The name of the registered format that recognises ``path``."""
    exporters = registry("exporters") if exporters is None else exporters
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist.")
    for name, cls in exporters.items():
        try:
            if cls.detect(path):
                return name
        except Exception:
            continue
    known = ", ".join(exporters.names())
    raise CheckpointError(
        f"{path} is not a checkpoint lowbit can read (known formats: {known}). "
        "Install lowbit-exporters for autoawq/gptq/xft, or point at a lowbit checkpoint."
    )


def read_checkpoint(path: Path | str, fmt: str | None = None, lazy: bool = False,
                    exporters: Registry | None = None, architectures: Registry | None = None) -> QuantizedModel:
    """Read any checkpoint a registered format recognises, with its architecture adapter (see
    :func:`with_adapter`); ``lazy``: where the format can (lowbit's own), tensors are read on
    access, so a checkpoint larger than memory can be exported."""
    exporters = registry("exporters") if exporters is None else exporters
    fmt = fmt or detect_format(path, exporters)
    try:
        if lazy and fmt == "lowbit":
            return with_adapter(exporters.get(fmt)().read(Path(path), lazy=True), architectures)
        return with_adapter(exporters.get(fmt)().read(Path(path)), architectures)
    except (CheckpointError, UnsupportedSchemeError):
        raise
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, IndexError, AttributeError, OverflowError) as err:
        # readers parse untrusted files: whatever a damaged one trips is still one line
        raise CheckpointError(f"cannot read {path} as {fmt}: {type(err).__name__}: {one_line(err)}") from err
