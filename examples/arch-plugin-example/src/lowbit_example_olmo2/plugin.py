"""The plugin's hook implementations: one architecture adapter."""

from __future__ import annotations

from lowbit import hookimpl


@hookimpl
def lowbit_register_architectures(register):
    from .adapter import Olmo2Adapter

    register.add(Olmo2Adapter())
