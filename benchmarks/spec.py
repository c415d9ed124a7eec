"""What ``--methods`` means: accel methods (composed with ``+``), named baselines, ``default`` (what
``accel.patch(pipe)`` picks with no method named) and ``none``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from accel.config import MethodConfig
from accel.errors import UnknownMethodError, did_you_mean
from accel.registry import get_method, method_names, parse_method

NONE = "none"
DEFAULT = "default"


@dataclass(frozen=True)
class BenchMethod:
    """One entry of ``--methods``: ``none``, an accel recipe (one or more configs) or a baseline."""

    label: str
    kind: str  # "none" | "accel" | "baseline" | "default"
    configs: tuple[MethodConfig, ...] = ()
    baseline: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    swept: bool = False  # whether the settings came from an explicit item (no sweep then)

    @property
    def family(self) -> str:
        """The series name in plots and the sweep group: the method names without settings."""
        if self.kind == "accel":
            return "+".join(_name_of(c) for c in self.configs)
        if self.kind == DEFAULT:
            return DEFAULT
        return self.baseline or NONE

    def settings_text(self) -> str:
        if self.kind == "accel":
            parts = []
            for config in self.configs:
                values = config.settings()
                parts.append(":".join(f"{k}={_fmt(v)}" for k, v in values.items()) or "defaults")
            return " + ".join(parts)
        if self.kind == DEFAULT:  # the runner replaces it with the recipe the patch chose
            return "accel.patch(pipe)'s recipe"
        return ":".join(f"{k}={_fmt(v)}" for k, v in self.settings.items()) or "defaults"


def _fmt(value: Any) -> str:
    return "/".join(map(str, value)) if isinstance(value, list) else str(value)


def _name_of(config: MethodConfig) -> str:
    from accel.registry import spec_for_config

    return spec_for_config(config).name


def _baselines() -> dict[str, Any]:
    from accel.benchmarks.baselines import BASELINES

    return BASELINES


def available_names() -> dict[str, str]:
    """Every name ``--methods`` accepts, with a one-line status ('available' or why not)."""
    names = {NONE: "available: the unaccelerated baseline",
             DEFAULT: "available: accel.patch(pipe) with no method named (the model's default recipe)"}
    for name in method_names():
        names[name] = f"available: {get_method(name).summary or 'accel method'}"
    for name, baseline in _baselines().items():
        reason = baseline.available()
        names[name] = f"unavailable: {reason}" if reason else f"available: {baseline.summary}"
    return names


def parse_item(item: str) -> BenchMethod:
    """Parse one ``--methods`` item: ``none``, ``delta-dit:interval=3``, ``a+b:k=v`` or ``fbcache:threshold=0.1``."""
    item = item.strip()
    if item == NONE:
        return BenchMethod(label=NONE, kind=NONE)
    if item == DEFAULT:
        return BenchMethod(label=DEFAULT, kind=DEFAULT)
    head = item.split(":", 1)[0]
    baselines = _baselines()
    if head in baselines:
        from accel.benchmarks.baselines import parse_settings

        baseline = baselines[head]
        reason = baseline.available()
        if reason:
            raise UnknownMethodError(f"Baseline {head!r} is not available on this install: {reason}.")
        pairs = _pairs(item)
        settings = {**baseline.defaults, **parse_settings(baseline, pairs)}
        return BenchMethod(label=item, kind="baseline", baseline=head, settings=settings, swept=bool(pairs))
    parts = [part for part in item.split("+")]
    known = [*method_names(), *baselines, NONE, DEFAULT]
    configs = []
    for part in parts:
        name = part.split(":", 1)[0].strip()
        if name not in method_names():
            raise UnknownMethodError(
                f"Unknown method {name!r}.{did_you_mean(name, known)} Available: {', '.join(sorted(known))}."
            )
        configs.append(parse_method(part))
    explicit = any(":" in part for part in parts)
    return BenchMethod(label=item, kind="accel", configs=tuple(configs), swept=explicit)


def _pairs(item: str) -> dict[str, str]:
    pairs = {}
    for pair in item.split(":")[1:]:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"Bad setting {pair!r} in {item!r}: settings are written key=value, e.g. 'fbcache:threshold=0.1'.")
        pairs[key.strip()] = value.strip()
    return pairs


def check_method_names(text: str) -> None:
    """Fail on an unknown or unavailable name in ``--methods`` before any model is loaded."""
    for item in (s.strip() for s in text.split(",")):
        if item and item != "all":
            parse_item(item)


def parse_methods(text: str, applicable: list[str]) -> list[BenchMethod]:
    """The whole ``--methods`` value. ``all`` expands to ``none`` + ``applicable`` (available names only)."""
    items = [item for item in (s.strip() for s in text.split(",")) if item]
    if not items:
        raise ValueError("--methods is empty; give e.g. 'none,delta-dit' or 'all'.")
    expanded: list[str] = []
    for item in items:
        expanded.extend([NONE, *applicable] if item == "all" else [item])
    # none always runs first: speedup and quality are relative to it
    ordered = [NONE, *(item for item in dict.fromkeys(expanded) if item != NONE)]
    return [parse_item(item) for item in ordered]
