"""Every lowbit hook, in one module.

A plugin is a module (or object) with functions marked ``@lowbit.hookimpl`` whose names match
the specs below, published through an entry point in the group ``lowbit``::

    [project.entry-points.lowbit]
    foo = "lowbit_foo.plugin"

Each registration hook receives a typed registrar; call its ``add(...)`` once per thing you
provide. lowbit's own built-ins register through these same hooks. Specs only grow: parameters
are added, never renamed or removed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .registry import Registrar

hookspec = pluggy.HookspecMarker("lowbit")
#: marks a plugin's hook implementations (re-exported as ``lowbit.hookimpl``)
hookimpl = pluggy.HookimplMarker("lowbit")


@hookspec
def lowbit_register_quantizers(register: Registrar) -> None:
    """Register quantization steps (RTN, AWQ, GPTQ, ...).

    :param register: ``register.add(cls)`` with a :class:`lowbit.Quantizer` subclass; its ``name``
        is what ``--method`` and recipes refer to.
    """


@hookspec
def lowbit_register_packers(register: Registrar) -> None:
    """Register packers: maps between a QuantizedWeight and one on-disk or in-memory layout.

    :param register: ``register.add(cls)`` with a :class:`lowbit.Packer` subclass, keyed by its
        ``name`` (the layout name, e.g. ``"autoawq-gemm"``).
    """


@hookspec
def lowbit_register_kernels(register: Registrar) -> None:
    """Register inference kernels for quantized linears.

    :param register: ``register.add(cls)`` with a :class:`lowbit.Kernel` subclass. Selection ranks
        kernels by ``priority`` among those whose ``probe(device)`` and ``can_implement(spec)``
        both return None (no reason to refuse).
    """


@hookspec
def lowbit_register_exporters(register: Registrar) -> None:
    """Register checkpoint formats (writers and readers).

    :param register: ``register.add(cls)`` with a :class:`lowbit.Exporter` subclass, keyed by its
        ``name`` (what ``--format`` refers to).
    """


@hookspec
def lowbit_register_architectures(register: Registrar) -> None:
    """Register architecture adapters that name a model's decoder layers and linear groups.

    :param register: ``register.add(adapter)`` with a :class:`lowbit.models.Adapter` instance,
        keyed by the HF ``model_type`` values in its ``model_types``.
    """


@hookspec
def lowbit_register_runtimes(register: Registrar) -> None:
    """Register runtimes that run a whole quantized checkpoint in their own code, in place of the
    transformers modules (lowbit-backend-cpu's native decoder is one).

    :param register: ``register.add(cls)`` with a :class:`lowbit.Runtime` subclass, keyed by its
        ``name`` (what ``--runtime`` refers to); ``--runtime auto`` takes the one of highest ``priority``
        whose ``unsupported(...)`` returns None.
    """
