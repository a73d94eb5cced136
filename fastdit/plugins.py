"""Third-party plugins: the entry points that add to fastdit's registries.

A package adds methods through the group ``fastdit.methods`` and model adapters through
``fastdit.pipelines`` (its pyproject.toml: ``[project.entry-points."fastdit.methods"]``, ``name =
"package.module:Class"``). Each registry loads its group once, the first time it is read.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from collections.abc import Callable

__all__ = ["load_entry_points", "same_class"]


# Groups loaded in this process: each is loaded once.
_loaded_groups: set[str] = set()


def load_entry_points(group: str, register: Callable[[object, str], None], what: str) -> None:
    """Load every entry point of ``group`` and pass what it names to ``register(obj, name)``; once
    per process, later calls return at once.

    A plugin that fails to load or register is skipped with a warning that names it and says why
    (``what``: "method", "model adapter"), so one broken package does not break fastdit.
    """
    if group in _loaded_groups:
        return
    _loaded_groups.add(group)
    for entry in importlib.metadata.entry_points(group=group):
        try:
            register(entry.load(), entry.name)
        except Exception as exc:  # noqa: BLE001 - any plugin failure: skip it, say which and why
            warnings.warn(
                f"fastdit: skipped {what} plugin {entry.name!r} ({entry.value}): "
                f"{type(exc).__name__}: {exc}",
                stacklevel=3,
            )


def same_class(a: type, b: type) -> bool:
    """Whether ``a`` and ``b`` are one class definition (a module reloaded defines it anew)."""
    return (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)
