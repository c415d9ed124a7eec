"""Hooks built on diffusers' HookRegistry, and their exact removal.

diffusers' ``remove_hook`` restores the forward chain but leaves an instance ``forward`` and an empty
``_diffusers_hook`` registry behind. A :class:`HookSet` remembers which of those it created and deletes
exactly those, so a removed patch leaves ``module.__dict__`` as it found it. Hooks that diffusers (or
the user) attached are left in place, so accel hooks coexist with e.g. FirstBlockCache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .parallel import register_inside_parallel_hooks

_MISSING = object()


class ModelHook:
    """The interface of diffusers' ``ModelHook``, restated so importing accel does not import diffusers.hooks
    (which pulls in triton). diffusers' ``HookRegistry`` only duck-types hooks, so these register there."""

    _is_stateful = False

    def __init__(self) -> None:
        self.fn_ref: Any = None

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        return module

    def deinitalize_hook(self, module: torch.nn.Module) -> torch.nn.Module:  # diffusers' spelling
        return module

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        return output

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        return module


def _registry(module: torch.nn.Module) -> Any:
    from diffusers.hooks import HookRegistry  # lazy: see ModelHook

    return HookRegistry.check_if_exists_or_initialize(module)


class SkipHook(ModelHook):
    """A hook whose ``new_forward`` decides per call whether to run the wrapped forward.

    ``decide(module, args, kwargs)`` returns the output to use instead of running the module, or
    ``None`` to run it. Used to skip blocks and branches (caching) and to count executions.

    ``needed()``, when given, says whether the hook has anything to do at all; when it says no, the module
    runs as if unhooked. It is read by ``torch.compile`` (keep it to plain attribute reads that change
    between calls, not steps): ``decide`` and ``after`` are compiler-disabled, so every hook that calls
    them splits the compiled graph, and a hook that is not needed should not.
    """

    def __init__(self, decide: Callable[..., Any], after: Callable[..., Any] | None = None,
                 needed: Callable[[], bool] | None = None) -> None:
        super().__init__()
        self._decide = decide
        self._after = after
        self._needed = needed

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self._needed is not None and not self._needed():
            return self.fn_ref.original_forward(*args, **kwargs)
        replacement = self._decide(module, args, kwargs)
        if replacement is not None:
            return replacement
        output = self.fn_ref.original_forward(*args, **kwargs)
        if self._after is not None:
            output = self._after(module, args, kwargs, output)
        return output


class CallbackHook(ModelHook):
    """A hook that calls plain functions before and after the wrapped forward."""

    def __init__(
        self,
        before: Callable[..., tuple[tuple[Any, ...], dict[str, Any]] | None] | None = None,
        after: Callable[[torch.nn.Module, Any], Any] | None = None,
    ) -> None:
        super().__init__()
        self._before = before
        self._after = after

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if self._before is not None:
            changed = self._before(module, args, kwargs)
            if changed is not None:
                return changed
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        return output if self._after is None else self._after(module, output)


@dataclass
class _ModuleRecord:
    module: torch.nn.Module
    had_registry: bool
    had_forward: bool


class HookSet:
    """Hooks and attribute overrides attached by one method of one patch; ``remove()`` undoes them exactly."""

    def __init__(self, prefix: str) -> None:
        if not prefix.startswith("accel."):
            raise ValueError(f"accel hook names start with 'accel.', got {prefix!r}.")
        self.prefix = prefix
        self._hooks: list[tuple[torch.nn.Module, str]] = []
        self._modules: dict[int, _ModuleRecord] = {}
        self._attrs: list[tuple[Any, str, Any]] = []

    def add_hook(self, module: torch.nn.Module, hook: ModelHook, role: str) -> ModelHook:
        """Attach ``hook`` to ``module`` under ``<prefix>.<role>``."""
        if id(module) not in self._modules:
            self._modules[id(module)] = _ModuleRecord(
                module, hasattr(module, "_diffusers_hook"), "forward" in module.__dict__
            )
        name = f"{self.prefix}.{role}"
        register_inside_parallel_hooks(_registry(module), hook, name)
        self._hooks.append((module, name))
        return hook

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """Set ``obj.name = value``, remembering the old value (or its absence) for removal."""
        old = obj.__dict__.get(name, _MISSING) if hasattr(obj, "__dict__") else getattr(obj, name, _MISSING)
        if isinstance(obj, torch.nn.Module) and name in obj._modules:
            old = obj._modules[name]
        self._attrs.append((obj, name, old))
        setattr(obj, name, value)

    def swap_class(self, obj: Any, cls: type) -> None:
        """Give ``obj`` the class ``cls`` (a subclass of its own), restored on removal."""
        self._attrs.append((obj, "__class__", type(obj)))
        obj.__class__ = cls

    @property
    def modules(self) -> list[torch.nn.Module]:
        return [record.module for record in self._modules.values()]

    def remove(self) -> None:
        """Detach every hook (newest first) and restore every attribute; safe to call twice."""
        for module, name in reversed(self._hooks):
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None:
                registry.remove_hook(name, recurse=False)
        for record in self._modules.values():
            _tidy_module(record)
        for obj, name, old in reversed(self._attrs):
            if old is _MISSING:
                if name in getattr(obj, "__dict__", {}) or (isinstance(obj, torch.nn.Module) and name in obj._modules):
                    delattr(obj, name)
            else:
                setattr(obj, name, old)
        self._hooks.clear()
        self._modules.clear()
        self._attrs.clear()


def _tidy_module(record: _ModuleRecord) -> None:
    """Delete the registry and instance ``forward`` that only our hooks needed."""
    module = record.module
    registry = module.__dict__.get("_diffusers_hook")
    if registry is None or registry.hooks:
        return
    if not record.had_registry:
        del module.__dict__["_diffusers_hook"]
    if not record.had_forward and "forward" in module.__dict__:
        del module.__dict__["forward"]


def invalidate_registry_caches(root: torch.nn.Module) -> None:
    """diffusers caches child-registry lists on the root; adding/removing block hooks stales them."""
    registry = root.__dict__.get("_diffusers_hook")
    if registry is not None and hasattr(registry, "invalidate_child_registries_cache"):
        registry.invalidate_child_registries_cache()


def accel_hook_names(root: torch.nn.Module) -> list[str]:
    """Every accel hook name attached anywhere under ``root`` (for tests and double-patch checks)."""
    names = []
    for module in root.modules():
        registry = module.__dict__.get("_diffusers_hook")
        if registry is not None:
            names.extend(name for name in registry.hooks if name.startswith("accel."))
    return names
