"""select_kernel(): probe + can_implement + priority, one error listing every reason.

Probes are cached per (kernel, device) and choices per (spec, device); nothing here runs on the
forward path.
"""

from __future__ import annotations

import torch

from .errors import NoKernelError
from .kernels.base import Kernel, KernelSpec
from .plugins import env_list, on_reset, registry

_probe_cache: dict[tuple[str, str], str | None] = {}
_choice_cache: dict[tuple, type[Kernel]] = {}


def clear_cache() -> None:
    _probe_cache.clear()
    _choice_cache.clear()


on_reset(clear_cache)


def disabled_kernels() -> set[str]:
    return env_list("LOWBIT_DISABLED_KERNELS")


def _probe(cls: type[Kernel], device: torch.device) -> str | None:
    key = (cls.name, str(device))
    if key not in _probe_cache:
        try:
            _probe_cache[key] = cls.probe(device)
        except Exception as err:  # a probe must never take selection down
            _probe_cache[key] = f"probe failed: {type(err).__name__}: {err}"
    return _probe_cache[key]


def kernel_reasons(spec: KernelSpec | None, device: torch.device) -> list[tuple[type[Kernel], str | None]]:
    """Every registered kernel, highest priority first, with its reason not to run (None = can)."""
    disabled = disabled_kernels()
    out = []
    kernels = sorted((k for _, k in registry("kernels").items()), key=lambda k: (-k.priority, k.name))
    for cls in kernels:
        if cls.name in disabled:
            reason = "disabled by LOWBIT_DISABLED_KERNELS"
        else:
            reason = _probe(cls, device)
            if reason is None and spec is not None:
                reason = cls.can_implement(spec)
        out.append((cls, reason))
    return out


def select_kernel(spec: KernelSpec, device: torch.device | str = "cpu", name: str | None = None) -> type[Kernel]:
    """The best kernel that can run ``spec`` on ``device`` (or the one called ``name``)."""
    device = torch.device(device)
    key = (spec, str(device), name, frozenset(disabled_kernels()))
    if key in _choice_cache:
        return _choice_cache[key]
    reasons = kernel_reasons(spec, device)
    if name is not None:
        registry("kernels").get(name)  # unknown name → error listing known kernels
        reasons = [(k, r) for k, r in reasons if k.name == name]
    for cls, reason in reasons:
        if reason is None:
            _choice_cache[key] = cls
            return cls
    lines = "\n".join(f"  - {k.name}: {r}" for k, r in reasons)
    raise NoKernelError(f"no kernel can run {spec.describe()} on {device}:\n{lines}")
