"""The frozen config base every method shares: validation helpers, settings parsing, serialization.

Configs serialize as ``{"_type", "_version", "_data"}`` (torchao's ``config_to_dict`` shape) so artifacts
written today load tomorrow.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any, ClassVar, TypeVar

C = TypeVar("C", bound="MethodConfig")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MethodConfig:
    """Base of every method config. Subclasses are ``@dataclass(frozen=True, kw_only=True)``.

    Subclasses validate in ``__post_init__`` with the ``check_*`` helpers below (never ``assert``, which
    vanishes under ``python -O``) and never mutate themselves while being applied.
    """

    VERSION: ClassVar[int] = 1

    def to_dict(self) -> dict[str, Any]:
        """Serialize as ``{"_type", "_version", "_data"}`` with JSON-safe values."""
        data = {f.name: _to_json(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"_type": type(self).__name__, "_version": self.VERSION, "_data": data}

    @classmethod
    def from_dict(cls: type[C], payload: dict[str, Any]) -> C:
        """Inverse of :meth:`to_dict`; refuses a payload written for another config type."""
        if payload.get("_type") != cls.__name__:
            raise ValueError(f"Cannot load {payload.get('_type')!r} settings into {cls.__name__}.")
        return cls.from_settings(payload.get("_data", {}))

    @classmethod
    def from_settings(cls: type[C], settings: dict[str, Any]) -> C:
        """Build from loosely typed settings (strings from a command line, JSON values), coercing each field."""
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, raw in settings.items():
            name = key.replace("-", "_")
            if name not in fields:
                accepted = ", ".join(sorted(fields)) or "(none)"
                raise ValueError(f"{cls.__name__} has no setting {key!r}. Accepted: {accepted}.")
            kwargs[name] = coerce(raw, hints[name], f"{cls.__name__}.{name}")
        return cls(**kwargs)

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def settings(self) -> dict[str, Any]:
        """The fields that differ from their defaults, for short labels in reports."""
        out = {}
        for f in dataclasses.fields(self):
            default = f.default if f.default is not dataclasses.MISSING else None
            if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = f.default_factory()  # type: ignore[misc]
            value = getattr(self, f.name)
            if value != default:
                out[f.name] = _to_json(value)
        return out


def _to_json(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    return value


def coerce(raw: Any, hint: Any, where: str) -> Any:
    """Coerce ``raw`` (often a string) to the annotated type ``hint``; clear error if it cannot."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if raw is None or (isinstance(raw, str) and raw.lower() == "none"):
            if type(None) in options:
                return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(raw, option, where)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise ValueError(f"{where}: cannot use {raw!r}; " + "; ".join(errors))
    if origin is tuple:
        args = typing.get_args(hint)
        items = raw.split("/") if isinstance(raw, str) else list(raw)
        item_type = args[0] if args else str
        try:
            return tuple(coerce(item, item_type, where) for item in items)
        except ValueError as exc:
            if isinstance(raw, str) and "," in raw:  # the one separator a spec string can't use for lists
                raise ValueError(f"{exc} Separate list items with '/', e.g. 0.2/0.6.") from None
            raise
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return check_choice(where, raw, hint)
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return raw.lower() in ("true", "1", "yes", "on")
        raise ValueError(f"{where} must be a bool (true/false), got {raw!r}.")
    if hint in (int, float):
        kind = "an int" if hint is int else "a number"
        if isinstance(raw, bool):
            raise ValueError(f"{where} must be {kind}, got {raw!r}.")
        try:
            value = hint(raw) if isinstance(raw, str) else raw
        except ValueError:
            raise ValueError(f"{where} must be {kind}, got {raw!r}.") from None
        if hint is int and isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"{where} must be an int, got {raw!r}.")
            value = int(value)
        if hint is float and isinstance(value, int):
            value = float(value)
        return value
    if hint is str:
        return str(raw)
    return raw


E = TypeVar("E", bound=enum.Enum)


def check_choice(name: str, value: Any, enum_cls: type[E]) -> E:
    """Coerce a string (or member) to ``enum_cls``; ``ValueError`` lists the accepted values."""
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(value)
    except ValueError:
        accepted = ", ".join(repr(m.value) for m in enum_cls)
        raise ValueError(f"{name} must be one of {accepted}, got {value!r}.") from None


def check_bool(name: str, value: Any) -> bool:
    """Validate a flag: exactly ``True`` or ``False`` (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}.")
    return value


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None, hint: str = "") -> int:
    """Validate an int in ``[low, high]`` (bounds optional)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__}).")
    _check_range(name, value, low, high, hint)
    return value


def check_float(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    hint: str = "",
) -> float:
    """Validate a real number in a (half-)open or closed range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__}).")
    value = float(value)
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        span = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        raise ValueError(f"{name} must be in {span}, got {value}.{(' ' + hint) if hint else ''}")
    return value


def _check_range(name: str, value: int, low: int | None, high: int | None, hint: str) -> None:
    if (low is not None and value < low) or (high is not None and value > high):
        if high is None:
            span = f">= {low}"
        elif low is None:
            span = f"<= {high}"
        else:
            span = f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an int {span}, got {value}.{(' ' + hint) if hint else ''}")
