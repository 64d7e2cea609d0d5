"""Typed registries whose errors list every known name."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from .errors import LowbitError, UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name → item, remembering which plugin registered each item."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._origin: dict[str, str] = {}

    def add(self, name: str, item: T, origin: str) -> None:
        if name in self._items and self._origin[name] != origin:
            raise LowbitError(
                f"{self.kind} {name!r} is registered twice (by {self._origin[name]} and {origin}); "
                f"disable one with LOWBIT_DISABLED_PLUGINS={origin}."
            )
        self._items[name] = item
        self._origin[name] = origin

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none"
            raise UnknownNameError(f"unknown {self.kind} {name!r}; known: {known}.") from None

    def origin(self, name: str) -> str:
        return self._origin[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)


class Registrar:
    """What a registration hook receives: ``register.add(thing)``.

    The item's key is its ``name`` attribute unless ``name=`` is given; for architecture
    adapters every value of ``model_types`` is a key.
    """

    def __init__(self, registry: Registry, origin: str):
        self._registry = registry
        self.origin = origin

    def add(self, item, name: str | None = None) -> None:
        if name is None and hasattr(item, "model_types"):
            for mt in item.model_types:
                self._registry.add(mt, item, self.origin)
            return
        key = name or getattr(item, "name", None)
        if not key:
            raise LowbitError(f"{self.origin}: a registered {self._registry.kind} needs a name attribute.")
        self._registry.add(key, item, self.origin)
