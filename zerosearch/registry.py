"""A lazy registry: the names a config field may take, each mapped to a factory imported only when used.

Used for the choices the config names (search backends, policy engines; STYLE.md 2). A name is added in one
of two ways:

* ``registry.lazy("vllm", "zerosearch.rollout.engines.vllm_engine")``: a module whose import registers the
  name (with the ``@registry.register("vllm")`` decorator), or ``"package.module:attribute"``, the factory
  itself;
* ``@registry.register("name")`` on a factory defined where the registry is importable.

Nothing is imported until :meth:`Registry.load` asks for that name, so listing the names never imports torch,
vllm or bm25s.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def normalize_name(name: str) -> str:
    """Case-insensitive, surrounding blanks ignored, ``-`` read as ``_``."""
    return name.strip().lower().replace("-", "_")


class Registry:
    """Names -> factories; ``aliases`` map other spellings (after normalising) to a name."""

    def __init__(self, kind: str, aliases: dict[str, str] | None = None,
                 normalize: Callable[[str], str] = normalize_name) -> None:
        self.kind = kind
        self.aliases = dict(aliases or {})
        self.normalize = normalize
        self._paths: dict[str, str] = {}
        self._factories: dict[str, Callable[..., Any]] = {}

    def lazy(self, name: str, path: str) -> None:
        """Register ``name`` as ``path``: ``"pkg.module"`` (its import registers ``name``) or ``"pkg.module:attr"``."""
        self._paths[name] = path

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: register a factory (a class or a function) under ``name``."""

        def decorator(factory: Callable[..., Any]) -> Callable[..., Any]:
            self._factories[name] = factory
            return factory

        return decorator

    def names(self) -> list[str]:
        """Every registered name, sorted (aliases not included)."""
        return sorted(set(self._paths) | set(self._factories))

    def resolve(self, name: str) -> str | None:
        """The registered name ``name`` stands for (normalised, aliases followed), or None if there is none."""
        key = self.normalize(name)
        key = self.aliases.get(key, key)
        return key if key in self._paths or key in self._factories else None

    def load(self, name: str) -> Callable[..., Any]:
        """The factory of registered ``name``, importing its module the first time. KeyError if unknown."""
        if name not in self._factories:
            if name not in self._paths:
                raise KeyError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}")
            module, _, attribute = self._paths[name].partition(":")
            imported = importlib.import_module(module)
            if attribute:
                self._factories[name] = getattr(imported, attribute)
            elif name not in self._factories:
                raise KeyError(f"importing {module} did not register the {self.kind} {name!r}")
        return self._factories[name]
