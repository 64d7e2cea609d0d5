"""The LowbitError hierarchy.

Every message says what was asked, what is supported and how to fix it. The CLI turns any
LowbitError into one line on stderr and exit status 2.
"""

from __future__ import annotations


def one_line(err: BaseException | str, limit: int = 300) -> str:
    """A (third-party) error message as one line: whitespace and line breaks collapsed, cut at
    ``limit`` characters; the exception's type name when it has no message."""
    text = " ".join(str(err).split())
    if not text and isinstance(err, BaseException):
        text = type(err).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


class LowbitError(Exception):
    """Base class of every error lowbit raises on purpose (bad input, missing pieces)."""


class UnknownNameError(LowbitError, KeyError):
    """A name (kernel, packer, exporter, quantizer, architecture) that no registry knows."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnsupportedSchemeError(LowbitError, ValueError):
    """A quantization scheme that a step, format, kernel or shape cannot hold."""


class NoKernelError(LowbitError, RuntimeError):
    """No registered kernel can run a given weight on a given device."""


class MissingDependencyError(LowbitError, ImportError):
    """An optional package is needed and not installed."""


class CheckpointError(LowbitError, ValueError):
    """A checkpoint that is unreadable, foreign, truncated or inconsistent."""


class CalibrationError(LowbitError, ValueError):
    """Calibration text that is missing, empty or too short."""


class ModelLoadError(LowbitError, ValueError):
    """A model that cannot be found, loaded or whose architecture is not supported."""


class OutputError(LowbitError, OSError):
    """An output location that cannot be written."""
