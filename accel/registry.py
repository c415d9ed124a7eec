"""The one registry: methods by name and config type, adapters by model class (MRO lookup).

A new method is one module that ends with ``@register_method(...)``; a new model family is one adapter
module that ends with ``register_adapter(...)``. Nothing central changes.
"""

from __future__ import annotations

import enum
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from accel.config import MethodConfig
from accel.errors import UnknownMethodError, UnsupportedModelError, did_you_mean

if TYPE_CHECKING:
    import torch

    from accel.adapters.base import ModelAdapter


class Stage(enum.IntEnum):
    """Order in which methods are applied: structure first, then numerics, then attention, then caching."""

    PRUNE = 0
    QUANTIZE = 1
    ATTENTION = 2
    CACHE = 3


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: how to build its config from a name and how to attach it."""

    name: str
    config_cls: type[MethodConfig]
    stage: Stage
    apply: Callable[..., Any]
    needs_denoiser: bool
    summary: str


_METHODS: dict[str, MethodSpec] = {}
_ADAPTERS: dict[str, type[ModelAdapter]] = {}
_BUILTIN_METHOD_MODULES = ("accel.methods",)
_BUILTIN_ADAPTER_MODULES = ("accel.adapters",)


def register_method(
    config_cls: type[MethodConfig],
    *,
    name: str,
    stage: Stage,
    needs_denoiser: bool = False,
    summary: str = "",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``apply(ctx, config) -> AppliedMethod`` under a kebab-case ``name``.

    Example::

        @register_method(MyConfig, name="my-method", stage=Stage.CACHE, needs_denoiser=True)
        def _apply(ctx, config):
            ...
    """
    if name != name.lower() or "_" in name or " " in name:
        raise ValueError(f"Method names are kebab-case (e.g. 'delta-dit'), got {name!r}.")

    def decorator(apply: Callable[..., Any]) -> Callable[..., Any]:
        if name in _METHODS and _METHODS[name].config_cls is not config_cls:
            raise ValueError(f"A different method is already registered as {name!r}.")
        _METHODS[name] = MethodSpec(name, config_cls, Stage(stage), apply, needs_denoiser, summary)
        return apply

    return decorator


def unregister_method(name: str) -> None:
    """Remove a method registration (tests and plugins that add temporary methods)."""
    _METHODS.pop(name, None)


def _load_builtins(modules: tuple[str, ...]) -> None:
    for module in modules:
        importlib.import_module(module)


def method_names() -> list[str]:
    """Every registered method name, sorted."""
    _load_builtins(_BUILTIN_METHOD_MODULES)
    return sorted(_METHODS)


def get_method(name: str) -> MethodSpec:
    """Look a method up by name; unknown names get a did-you-mean and the list of accepted names."""
    _load_builtins(_BUILTIN_METHOD_MODULES)
    if name in _METHODS:
        return _METHODS[name]
    available = ", ".join(sorted(_METHODS)) or "(none registered)"
    raise UnknownMethodError(f"Unknown method {name!r}.{did_you_mean(name, _METHODS)} Available: {available}.")


def spec_for_config(config: MethodConfig) -> MethodSpec:
    """The registered method whose config type is ``type(config)``."""
    _load_builtins(_BUILTIN_METHOD_MODULES)
    for spec in _METHODS.values():
        if type(config) is spec.config_cls:
            return spec
    raise UnknownMethodError(
        f"{type(config).__name__} is not the config of a registered method. "
        f"Registered: {', '.join(sorted(_METHODS))}."
    )


def parse_method(item: str) -> MethodConfig:
    """Parse ``"name"`` or ``"name:key=value:key=value"`` (the CLI's syntax) into a config."""
    if not isinstance(item, str) or not item.strip():
        raise UnknownMethodError(f"A method must be a non-empty name such as 'delta-dit', got {item!r}.")
    name, *pairs = [part.strip() for part in item.strip().split(":")]
    spec = get_method(name)
    settings: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"Bad setting {pair!r} in {item!r}: settings are written key=value, e.g. 'delta-dit:interval=3'.")
        settings[key.strip()] = value.strip()
    return spec.config_cls.from_settings(settings)


def resolve_method(item: str | MethodConfig) -> tuple[MethodSpec, MethodConfig]:
    """A method given as a name, a ``name:key=value`` string or a config instance."""
    if isinstance(item, MethodConfig):
        return spec_for_config(item), item
    if isinstance(item, str):
        config = parse_method(item)
        return spec_for_config(config), config
    raise UnknownMethodError(
        f"Methods are names such as 'delta-dit' or config objects such as accel.DeltaDiTConfig(), "
        f"got {type(item).__name__}: {item!r}."
    )


def register_adapter(*model_classes: str | type, adapter: type[ModelAdapter] | None = None) -> Any:
    """Register an adapter for model classes (by class or class name). Usable as a class decorator.

    Example::

        @register_adapter("MyTransformer2DModel")
        class MyAdapter(ModelAdapter):
            ...
    """

    def decorator(adapter_cls: type[ModelAdapter]) -> type[ModelAdapter]:
        for cls in model_classes:
            _ADAPTERS[cls if isinstance(cls, str) else cls.__name__] = adapter_cls
        return adapter_cls

    return decorator(adapter) if adapter is not None else decorator


def supported_model_classes() -> list[str]:
    """Names of every model class with an adapter."""
    _load_builtins(_BUILTIN_ADAPTER_MODULES)
    return sorted(_ADAPTERS)


def find_adapter(model: torch.nn.Module) -> ModelAdapter:
    """The adapter for ``model``, found along its class MRO (so subclasses inherit their parent's)."""
    _load_builtins(_BUILTIN_ADAPTER_MODULES)
    for cls in type(model).__mro__:
        adapter_cls = _ADAPTERS.get(cls.__name__)
        if adapter_cls is not None:
            return adapter_cls(model)
    raise UnsupportedModelError(
        f"No accel adapter for {type(model).__name__}. Supported: {', '.join(supported_model_classes())}. "
        "Register one with accel.register_adapter('YourModelClass')(YourAdapter), "
        "subclassing accel.adapters.ModelAdapter."
    )
