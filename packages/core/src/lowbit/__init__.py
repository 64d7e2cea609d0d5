"""lowbit: low-bit weight quantization of LLMs (AWQ, GPTQ, RTN), fast kernels, real formats."""

from __future__ import annotations

__version__ = "0.1.0"

from .algorithms.base import LayerContext, LinearGroup, Quantizer
from .errors import (
    CalibrationError,
    CheckpointError,
    LowbitError,
    MissingDependencyError,
    ModelLoadError,
    NoKernelError,
    OutputError,
    UnknownNameError,
    UnsupportedSchemeError,
)
from .exporter import Exporter
from .exporting import export, read_checkpoint
from .hookspecs import hookimpl
from .kernels.base import Kernel, KernelSpec
from .packing import Packer
from .plugins import get_plugin_manager, registry
from .qmodel import QuantizedModel
from .qweight import QuantizedWeight
from .recipe import Option, Recipe
from .run.runtime import Runtime
from .scheme import QuantScheme
from .selection import select_kernel

__all__ = [
    "__version__",
    "CalibrationError",
    "CheckpointError",
    "Exporter",
    "Kernel",
    "KernelSpec",
    "LayerContext",
    "LinearGroup",
    "LowbitError",
    "MissingDependencyError",
    "ModelLoadError",
    "NoKernelError",
    "Option",
    "OutputError",
    "Packer",
    "QuantScheme",
    "QuantizedModel",
    "QuantizedWeight",
    "Quantizer",
    "Recipe",
    "Runtime",
    "UnknownNameError",
    "UnsupportedSchemeError",
    "export",
    "get_plugin_manager",
    "hookimpl",
    "read_checkpoint",
    "registry",
    "select_kernel",
]
