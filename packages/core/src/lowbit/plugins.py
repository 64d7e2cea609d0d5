"""The plugin manager: entry-point group ``lowbit``, built-ins, and the env switches.

- ``LOWBIT_DISABLE_PLUGIN_AUTOLOAD=1``: load no entry points (built-ins only).
- ``LOWBIT_DISABLED_PLUGINS=a,b``: skip these plugins (entry-point names or distributions).
- ``LOWBIT_DISABLED_KERNELS=x,y``: kernels that selection must not choose (see selection.py).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

import pluggy

from . import _builtin, hookspecs
from .errors import LowbitError
from .registry import Registrar, Registry

ENTRY_POINT_GROUP = "lowbit"
#: lowbit's own hook implementations, registered first and like any plugin's. Imported with an
#: import statement, not by a string through importlib, so that static analysis sees the arrow: an
#: import of the plugin manager from anything the built-ins import would show as the loop it is
BUILTIN_MODULE = _builtin.__name__
_reset_callbacks: list[Callable[[], None]] = []

KINDS = {
    "quantizers": ("quantizer", "lowbit_register_quantizers"),
    "packers": ("packer", "lowbit_register_packers"),
    "kernels": ("kernel", "lowbit_register_kernels"),
    "exporters": ("exporter", "lowbit_register_exporters"),
    "architectures": ("architecture", "lowbit_register_architectures"),
    "runtimes": ("runtime", "lowbit_register_runtimes"),
}


def env_list(var: str) -> set[str]:
    """The comma-separated names in environment variable ``var`` (blanks dropped)."""
    return {x.strip() for x in os.environ.get(var, "").split(",") if x.strip()}


def _version() -> str:
    try:
        return metadata.version("lowbit")
    except metadata.PackageNotFoundError:  # run from a source tree
        return "unknown"


@dataclass
class PluginInfo:
    name: str
    distribution: str
    version: str
    module: str
    status: str  # "loaded", "disabled", "failed: ..."


class PluginManager:
    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("lowbit")
        self.pm.add_hookspecs(hookspecs)
        self.plugins: list[PluginInfo] = []
        self.registries: dict[str, Registry] = {k: Registry(kind) for k, (kind, _) in KINDS.items()}
        self._load()

    def _load(self) -> None:
        self._register(_builtin, PluginInfo("lowbit", "lowbit", _version(), BUILTIN_MODULE, "loaded"))
        if os.environ.get("LOWBIT_DISABLE_PLUGIN_AUTOLOAD", "").strip() not in ("", "0", "false"):
            return
        disabled = env_list("LOWBIT_DISABLED_PLUGINS")
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist else "?"
            version = ep.dist.version if ep.dist else "?"
            info = PluginInfo(ep.name, dist, version, ep.value, "loaded")
            if ep.name in disabled or dist in disabled:
                info.status = "disabled by LOWBIT_DISABLED_PLUGINS"
                self.plugins.append(info)
                continue
            try:
                module = ep.load()
            except Exception as err:  # a broken third-party plugin must not break lowbit
                info.status = f"failed: {type(err).__name__}: {err}"
                warnings.warn(f"lowbit plugin {ep.name!r} ({dist}) failed to load: {err}", stacklevel=2)
                self.plugins.append(info)
                continue
            self._register(module, info)

    def _register(self, module, info: PluginInfo) -> None:
        self.pm.register(module, name=info.name)
        try:
            self.pm.check_pending()  # a misspelled hook fails loudly
        except pluggy.PluginValidationError as err:
            self.pm.unregister(module)
            raise LowbitError(f"plugin {info.name!r} ({info.distribution}): {err}") from err
        for key, (_, hook) in KINDS.items():
            impls = [i for i in getattr(self.pm.hook, hook).get_hookimpls() if i.plugin is module]
            for impl in impls:
                impl.function(register=Registrar(self.registries[key], info.name))
        self.plugins.append(info)


_manager: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    global _manager
    if _manager is None:
        _manager = PluginManager()
    return _manager


def reset_plugin_manager() -> None:
    """Forget loaded plugins (tests use it after changing the LOWBIT_* switches)."""
    global _manager
    _manager = None
    for callback in _reset_callbacks:
        callback()


def on_reset(callback: Callable[[], None]) -> None:
    """Call ``callback`` whenever the plugins are forgotten (caches of what they registered)."""
    if callback not in _reset_callbacks:
        _reset_callbacks.append(callback)


def registry(kind: str) -> Registry:
    """``registry("kernels")`` etc.: one of quantizers, packers, kernels, exporters, architectures, runtimes."""
    return get_plugin_manager().registries[kind]
