"""One way to register extensions (stages, sources, attacks, training modes, executors).

A `Registry` holds named entries in registration order. An entry's target is either an object or a lazy
"module:attr" string, imported on first `load`, so that listing names, labels and needs (CLI help, reports,
plans) never imports torch or a model library. Each entry declares what it `needs` (words such as "mlm": a
masked LM, "model": a downloaded model, "gpu", "stages": augmentation stages, "data_root": an input folder) and
what it is (`tags`, e.g. a stage's modality); callers ask `names(needs=..., without=...)` instead of listing
extension names by hand.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Entry:
    name: str
    target: Any  # an object, or "module:attr" imported by load()
    needs: frozenset[str] = frozenset()
    description: str = ""
    label: str | None = None  # display name (reports); the name when None
    tags: frozenset[str] = frozenset()
    # settings the extension brings when the user gives none, e.g. a mode's augmentation stages
    defaults: tuple[tuple[str, Any], ...] = ()

    def default(self, name: str, fallback: Any = None) -> Any:
        return dict(self.defaults).get(name, fallback)

    @property
    def lazy(self) -> bool:
        return isinstance(self.target, str)

    @property
    def display(self) -> str:
        return self.label or self.name

    def load(self) -> Any:
        if not self.lazy:
            return self.target
        module_name, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module_name), attr)


class Registry:
    """Named extensions of one kind ("stage", "attack", ...). `registry[name]` loads, `name in registry` does not."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, target: Any, *, needs: Iterable[str] = (), description: str = "",
                 label: str | None = None, tags: Iterable[str] = (), defaults: dict[str, Any] | None = None) -> Entry:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        if isinstance(target, str) and (target.count(":") != 1 or not all(target.split(":"))):
            raise ValueError(f"{self.kind} {name!r}: a lazy target is 'module:attr', got {target!r}")
        entry = Entry(name, target, frozenset(needs), description, label, frozenset(tags),
                      tuple((defaults or {}).items()))
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> Entry:
        """The entry (its declaration), without importing its target."""
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; valid: {', '.join(self._entries)}") from None

    def load(self, name: str) -> Any:
        return self.get(name).load()

    __getitem__ = load

    def names(self, needs: Iterable[str] = (), without: Iterable[str] = (), tags: Iterable[str] = ()) -> tuple[str, ...]:
        """Names in registration order whose entries need all of `needs`, none of `without`, and carry all `tags`."""
        needs, without, tags = frozenset(needs), frozenset(without), frozenset(tags)
        return tuple(e.name for e in self._entries.values()
                     if needs <= e.needs and not without & e.needs and tags <= e.tags)

    def entries(self) -> tuple[Entry, ...]:
        return tuple(self._entries.values())

    def labels(self) -> dict[str, str]:
        return {e.name: e.display for e in self._entries.values()}

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"
