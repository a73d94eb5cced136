"""Every hook fastdit installs is a diffusers ``ModelHook`` in its module's ``HookRegistry``.

:class:`HookSet` registers hooks under names and removes exactly those, deleting the registries it
created: one removal path for the transformer hook, the model families' block hooks and the
command line's timing probes alike. :func:`function_hook` makes a hook of two plain functions.
diffusers is imported on first use, not when fastdit is.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["HookSet", "function_hook", "has_hook"]

PreForward = Callable[[torch.nn.Module, tuple, dict], tuple[tuple, dict]]
PostForward = Callable[[torch.nn.Module, Any], Any]


@functools.cache
def _function_hook_class() -> type:
    from diffusers.hooks.hooks import ModelHook

    class FunctionHook(ModelHook):
        """``pre_forward(module, args, kwargs) -> (args, kwargs)`` before the module's forward,
        ``post_forward(module, output) -> output`` after it; either may be ``None``."""

        def __init__(self, pre_forward: PreForward | None, post_forward: PostForward | None) -> None:
            super().__init__()
            self._pre_forward, self._post_forward = pre_forward, post_forward

        def pre_forward(self, module, *args, **kwargs):
            if self._pre_forward is None:
                return args, kwargs
            return self._pre_forward(module, args, kwargs)

        def post_forward(self, module, output):
            if self._post_forward is None:
                return output
            return self._post_forward(module, output)

    return FunctionHook


def function_hook(pre_forward: PreForward | None = None, post_forward: PostForward | None = None):
    """A diffusers ``ModelHook`` that runs ``pre_forward`` and/or ``post_forward``."""
    return _function_hook_class()(pre_forward, post_forward)


def has_hook(module: torch.nn.Module, name: str) -> bool:
    """Whether ``module``'s diffusers hook registry holds a hook named ``name``."""
    registry = getattr(module, "_diffusers_hook", None)
    return registry is not None and name in registry.hooks


# The hook registries fastdit created (and deletes again once they hold no hook), whichever
# HookSet added the hook that needed them.
_created_registries: weakref.WeakSet = weakref.WeakSet()


class HookSet:
    """diffusers ``ModelHook`` objects registered on modules under names; :meth:`remove` undoes it."""

    def __init__(self) -> None:
        self._entries: list[tuple[torch.nn.Module, str]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, module: torch.nn.Module, name: str, hook) -> None:
        """Register ``hook`` as ``name`` on ``module`` (outside every hook already there)."""
        from diffusers.hooks.hooks import HookRegistry

        if has_hook(module, name):
            raise RuntimeError(
                f"a hook named {name!r} is already registered on this {type(module).__name__}"
            )
        if not hasattr(module, "_diffusers_hook"):
            _created_registries.add(HookRegistry.check_if_exists_or_initialize(module))
        module._diffusers_hook.register_hook(hook, name)
        self._entries.append((module, name))

    def refresh_caches(self) -> None:
        """Drop the child-registry lists diffusers caches in the registries these hooks touch
        (its cache-context propagation reads them): call after adding hooks."""
        _refresh_caches(module for module, _ in self._entries)

    def remove(self) -> None:
        """Remove every hook added, last first; delete the registries fastdit created once they
        hold no hook."""
        entries, self._entries = self._entries, []
        for module, name in reversed(entries):
            registry = module._diffusers_hook
            registry.remove_hook(name, recurse=False)
            if not registry.hooks and registry in _created_registries:
                del module._diffusers_hook
        _refresh_caches(module for module, _ in entries)  # registries that stay (others' hooks)


def _refresh_caches(modules) -> None:
    seen: set[int] = set()
    for module in modules:
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and id(registry) not in seen:
            seen.add(id(registry))
            registry.invalidate_child_registries_cache()
