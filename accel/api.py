"""``accel.patch``: attach methods to a pipeline or model in one call, and remove them exactly."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from accel.adapters.base import ModelAdapter
from accel.config import MethodConfig
from accel.contract import Handle, PatchContext
from accel.errors import AlreadyPatchedError, IncompatibleMethodsError, UnsupportedModelError
from accel.hooks import CallbackHook, HookSet, invalidate_registry_caches
from accel.modules import resolve_target
from accel.noise import prediction_of
from accel.registry import MethodSpec, Stage, find_adapter, get_method, method_names, resolve_method
from accel.steps import StepTracker, host_timestep

logger = logging.getLogger(__name__)

_PATCH_ATTR = "_accel_patch"


@dataclass
class _Attached:
    name: str
    spec: MethodSpec | None  # None: attached with Patch.attach, not from the registry
    config: MethodConfig | None
    hooks: HookSet
    handle: Handle


def _order_and_check(
    items: list[tuple[MethodSpec, MethodConfig]], adapter: ModelAdapter
) -> list[tuple[MethodSpec, MethodConfig]]:
    """Order methods by stage and refuse what cannot compose, before anything is attached."""
    by_stage: dict[Stage, MethodSpec] = {}
    for spec, _ in items:
        if spec.stage in by_stage:
            other = by_stage[spec.stage]
            what = "twice" if other.name == spec.name else f"together with {other.name!r}"
            raise IncompatibleMethodsError(
                f"Method {spec.name!r} cannot be applied {what}: both are {spec.stage.name.lower()} methods "
                f"and one patch takes at most one of each kind (prune, quantize, attention, cache). "
                "Pick one, or pass one configured instance."
            )
        by_stage[spec.stage] = spec
        if spec.needs_denoiser and not adapter.is_denoiser:
            fitting = ", ".join(n for n in method_names() if not get_method(n).needs_denoiser)
            raise UnsupportedModelError(
                f"Method {spec.name!r} cannot apply to {type(adapter.model).__name__}: it works across "
                f"denoising steps and this model has no denoising loop. Methods that apply to classifiers: "
                f"{fitting}."
            )
    return sorted(items, key=lambda item: item[0].stage)


def _options_to_methods(options: dict[str, Any]) -> list[str | MethodConfig]:
    """``delta_dit={"interval": 3}`` style keyword options: select and configure a method by name."""
    methods: list[str | MethodConfig] = []
    for key, settings in options.items():
        spec = get_method(key.replace("_", "-"))
        if isinstance(settings, MethodConfig):
            methods.append(settings)
        elif isinstance(settings, dict):
            methods.append(spec.config_cls.from_settings(settings))
        elif settings is True:
            methods.append(spec.config_cls())
        else:
            raise TypeError(
                f"accel.patch option {key}= takes a dict of settings, a {spec.config_cls.__name__} or True, "
                f"got {type(settings).__name__}."
            )
    return methods


# The recipe ``accel.patch(pipe)`` uses on a denoiser pipeline: BAC with the whole block stack as one unit,
# half of the steps updated, chosen by a DP weighted with each step's √SNR over feature distances that one
# calibration call (accel's own conditions and seeds, 50 steps) records before the first call with new
# settings; they serve every step count, so every call is cached and its output depends on that call alone.
# A reused step returns the denoiser's last clean-sample estimate x̂0 re-expressed at the current noisy input
# (``reuse="x0"``) where the scheduler names its parameterisation, else the stack's Δ. Chosen by measurement
# on digits-dit (DDPM), digits-pixart (DPM-Solver++) and PixArt-XL's width (benchmarks/RESULTS.md,
# "Caching"): at the same schedule x̂0 reuse lost much less on DDPM, where fresh noise enters every step and
# ε follows it while x̂0 barely moves; it was on par on DPM-Solver++ (a little behind only at very few
# steps); it also skips the embeddings and the output layer, and at PixArt-XL's width both reuses run at the
# speed their compute fraction predicts. Half the steps, not fewer: at 20-30 steps, the counts most users
# run, fewer fell below 30 dB on one of the two models. Probed sensitivities (``weighting="pooled"`` or
# ``"sensitivity"``) do better on DPM-Solver but cost extra calls. A bare model has no scheduler to read
# noise levels from, so it gets Δ-DiT, which needs neither calibration nor noise levels. Families may
# override both with an adapter ``default_recipe()``.
DEFAULT_DENOISER_RECIPE: tuple[str, ...] = (
    "bac:granularity=stack:weighting=snr:update_fraction=0.5:reuse=x0",)
DELTA_DENOISER_RECIPE: tuple[str, ...] = ("bac:granularity=stack:weighting=snr:update_fraction=0.5",)
BARE_DENOISER_RECIPE: tuple[str, ...] = ("delta-dit",)


def _default_methods(adapter: ModelAdapter, pipeline: Any | None) -> list[str | MethodConfig]:
    recipe = getattr(adapter, "default_recipe", None)
    methods = list(recipe()) if callable(recipe) else []
    if not methods and adapter.is_denoiser:
        scheduler = getattr(pipeline, "scheduler", None)
        if scheduler is None:
            methods = list(BARE_DENOISER_RECIPE)
        else:
            methods = list(DEFAULT_DENOISER_RECIPE if prediction_of(scheduler) else DELTA_DENOISER_RECIPE)
    if not methods:
        raise UnsupportedModelError(
            f"accel.patch was given no method and has no default recipe for {adapter.family} models "
            f"({type(adapter.model).__name__}). Name one, e.g. accel.patch(model, 'quest')."
        )
    return methods


def _call_arguments(signature: inspect.Signature, pipe: Any, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> dict[str, Any]:
    """A pipeline call's arguments by name, as the pipeline's ``__call__`` (``signature``) binds them, without
    ``self``. Raises TypeError when they do not fit."""
    bound = signature.bind_partial(pipe, *args, **kwargs).arguments
    bound.pop(next(iter(signature.parameters)), None)
    return dict(bound)


class Patch:
    """Methods attached to one target. Remove with :meth:`remove` or ``with accel.patch(...)``."""

    def __init__(self, target: Any, pipeline: Any | None, model: torch.nn.Module, adapter: ModelAdapter) -> None:
        self.target = target
        self.pipeline = pipeline
        self.model = model
        self.adapter = adapter
        self.tracker = StepTracker()
        self._attached: list[_Attached] = []
        self._own_hooks = HookSet("accel.patch")
        self._removed = False
        # The scheduler's timesteps on the host, copied once per pipeline call: reading a device
        # timestep in every forward would sync the host with the device each time.
        self._host_timesteps: list[float] | None = None
        self.tracker.on_reset(self._forget_host_timesteps)
        self._in_before_call = False

    @classmethod
    def on(cls, target: Any) -> Patch:
        """An empty patch on ``target`` that tracks denoising steps, for tools that attach a method the
        registry does not hold (a baseline, an experiment) with :meth:`attach`. ``accel.patch`` is the
        way to attach registered methods."""
        pipeline, model = resolve_target(target)
        _refuse_patched(model)
        result = cls(target, pipeline, model, find_adapter(model))
        result._install_step_tracking()
        return result

    @property
    def methods(self) -> tuple[MethodConfig, ...]:
        return tuple(item.config for item in self._attached if item.config is not None)

    def handle(self, method: str) -> Handle:
        """The attached handle of ``method`` (by registry name, e.g. ``"bac"``): its runtime state, for
        reports and tools that read more than ``report()`` gives."""
        for item in self._attached:
            if item.name == method:
                return item.handle
        names = ", ".join(item.name for item in self._attached) or "none"
        raise KeyError(f"{method!r} is not attached to this patch (attached: {names}).")

    def attach(self, name: str, build: Callable[[PatchContext], Handle]) -> Handle:
        """Attach an unregistered method: ``build(ctx)`` hooks through ``ctx.hooks`` and returns its
        handle. It is removed, reported and reachable by ``name`` like a registered method."""
        return self._attach_built(name, None, None, build)

    def _attach(self, spec: MethodSpec, config: MethodConfig) -> None:
        self._attach_built(spec.name, spec, config, lambda ctx: spec.apply(ctx, config))

    def _attach_built(self, name: str, spec: MethodSpec | None, config: MethodConfig | None,
                      build: Callable[[PatchContext], Handle]) -> Handle:
        hooks = HookSet(f"accel.{name}")
        ctx = PatchContext(
            target=self.target, pipeline=self.pipeline, model=self.model, adapter=self.adapter,
            tracker=self.tracker, hooks=hooks, method=name,
            applied=[(a.spec, a.config) for a in self._attached if a.spec is not None and a.config],
        )
        try:
            handle = build(ctx)
            if not isinstance(handle, Handle):
                raise TypeError(f"Method {name!r} returned {type(handle).__name__} from apply, which is not "
                                "a handle: it needs report() -> dict and remove() (see accel.contract.Handle).")
        except BaseException:
            hooks.remove()
            raise
        self._attached.append(_Attached(name, spec, config, hooks, handle))
        # Pruning may swap the model's block lists: later methods need a fresh view.
        self.adapter = find_adapter(self.model)
        return handle

    def _before_call_hooks(self) -> list[Callable[[Any, dict[str, Any]], None]]:
        return [item.handle.before_call for item in self._attached
                if callable(getattr(item.handle, "before_call", None))]

    def prepare(self, *args: Any, **kwargs: Any) -> None:
        """Does now what the attached methods do before a pipeline call with these arguments (BAC calibrates
        for call settings it has not seen), without running the call, so that the call's latency is the
        methods' own. Takes the pipeline call's arguments; a call that needs no preparation costs nothing.

        Raises:
            TypeError: the patch is not on a pipeline, or the arguments do not fit its call.
        """
        if self.pipeline is None:
            raise TypeError(f"Patch.prepare takes a pipeline call's arguments; this patch is on a bare "
                            f"{type(self.model).__name__}, whose methods need no preparation.")
        signature = inspect.signature(type(self.pipeline).__call__)
        try:
            bound = _call_arguments(signature, self.pipeline, args, kwargs)
        except TypeError as exc:
            raise TypeError(f"Patch.prepare: the arguments do not fit {type(self.pipeline).__name__}'s call: "
                            f"{exc}.") from None
        self._run_before_call(self.pipeline, bound)

    def _run_before_call(self, pipe: Any, bound: dict[str, Any]) -> None:
        if self._in_before_call:  # a hook's own pipeline calls (calibration) skip the hooks
            return
        self._in_before_call = True
        try:
            for hook in self._before_call_hooks():
                hook(pipe, dict(bound))
        finally:
            self._in_before_call = False

    def _install_call_hook(self) -> None:
        """Handles with a ``before_call(pipeline, kwargs)`` see each pipeline call's arguments before it runs
        (BAC calibrates for new call settings there, with every method attached and the steps tracked).
        A pipeline's call is looked up on its class, so the instance gets a subclass of the same name whose
        ``__call__`` runs them first; removal restores the class."""
        if self.pipeline is None or not self._before_call_hooks():
            return
        cls = type(self.pipeline)
        original = cls.__call__
        signature = inspect.signature(original)

        @functools.wraps(original)
        def __call__(pipe: Any, *args: Any, **kwargs: Any) -> Any:
            if not self._in_before_call:
                self._run_before_call(pipe, _call_arguments(signature, pipe, args, kwargs))
            return original(pipe, *args, **kwargs)

        namespace = {"__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__}
        self._own_hooks.swap_class(self.pipeline, type(cls.__name__, (cls,), namespace))

    def _install_step_tracking(self) -> None:
        adapter = self.adapter

        # Compiler-disabled: reading the timestep is a host sync and the state is a Python counter; under
        # torch.compile this runs eagerly at the head of the denoiser's graph instead of being guarded.
        @torch.compiler.disable
        def before(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            layout = adapter.token_layout(args, kwargs) if adapter.is_denoiser else None
            timestep = host_timestep(adapter.timestep(args, kwargs), self._host_timesteps,
                                     self.tracker.next_step_index())
            self.tracker.begin_forward(timestep, adapter.batch_size(args, kwargs), layout, _context_name(hook))

        hook = _TrackerHook(before)
        self._own_hooks.add_hook(self.model, hook, "steps")
        scheduler = getattr(self.pipeline, "scheduler", None)
        if scheduler is not None and hasattr(scheduler, "set_timesteps"):
            self._own_hooks.set_attr(scheduler, "set_timesteps", self._wrap_set_timesteps(scheduler))
        if scheduler is not None and callable(getattr(scheduler, "step", None)):
            self._own_hooks.set_attr(scheduler, "step", self._wrap_step(scheduler))
        self._own_hooks.set_attr(self.model, _PATCH_ATTR, self)

    def _forget_host_timesteps(self) -> None:
        # Any reset but set_timesteps' own (patch.reset, a restart seen by the tracker) may start a loop
        # over other timesteps than the scheduler's.
        self._host_timesteps = None

    def _wrap_set_timesteps(self, scheduler: Any) -> Callable[..., Any]:
        original = scheduler.set_timesteps

        # diffusers' retrieve_timesteps reads the signature for `sigmas` / `timesteps` support:
        # functools.wraps keeps it visible through the wrapper (inspect follows __wrapped__).
        @functools.wraps(original)
        def set_timesteps(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            timesteps = getattr(scheduler, "timesteps", None)
            self.tracker.reset(num_steps=len(timesteps) if timesteps is not None else None)
            self._host_timesteps = _host_copy(timesteps)  # after the reset, which drops any older copy
            return result

        return set_timesteps

    def _wrap_step(self, scheduler: Any) -> Callable[..., Any]:
        original = scheduler.step

        @functools.wraps(original)
        def step(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            self.tracker.end_step()
            return result

        return step

    def reset(self, num_steps: int | None = None) -> None:
        """Forget all step state and caches (e.g. before driving a bare model with a new schedule)."""
        self.tracker.reset(num_steps)

    def remove(self) -> None:
        """Detach everything, newest first; the model is exactly as before ``patch``. Safe to call twice."""
        if self._removed:
            return
        self._own_hooks.remove()
        for item in reversed(self._attached):
            item.hooks.remove()
            item.handle.remove()
        self._attached.clear()
        invalidate_registry_caches(self.model)
        self._removed = True

    def report(self) -> PatchReport:
        """What ran: per method, the facts it records (blocks skipped per step, density, bits...)."""
        sections = {}
        for item in self._attached:
            settings = item.config.settings() if item.config is not None else {}
            sections[item.name] = {"settings": settings, **item.handle.report()}
        state = self.tracker.state
        return PatchReport(
            model=type(self.model).__name__,
            family=self.adapter.family,
            methods=sections,
            steps_seen=state.step_index + 1,
            forwards=self.tracker.forwards,
        )

    def __enter__(self) -> Patch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        names = ", ".join(item.name for item in self._attached) or "no methods"
        state = "removed" if self._removed else "active"
        return f"<accel.Patch {state} on {type(self.model).__name__}: {names}>"


class _TrackerHook(CallbackHook):
    """The step tracker's hook; stateful so diffusers' ``cache_context`` hands it the branch name."""

    _is_stateful = True

    def __init__(self, before: Callable[..., Any]) -> None:
        super().__init__(before=before)
        from diffusers.hooks.hooks import StateManager

        self.context_state = StateManager(_NoState)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        return module


class _NoState:
    def reset(self, *args: Any, **kwargs: Any) -> None:
        return None


def _context_name(hook: _TrackerHook) -> str | None:
    context = hook.context_state._context
    return None if context is None else context.name


@dataclass(frozen=True)
class PatchReport:
    """A patch's report; ``str()`` renders it for people, ``to_dict()`` for JSON."""

    model: str
    family: str
    methods: dict[str, dict[str, Any]]
    steps_seen: int
    forwards: int

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "family": self.family, "methods": self.methods,
                "steps_seen": self.steps_seen, "forwards": self.forwards}

    def __str__(self) -> str:
        lines = [f"accel patch on {self.model} ({self.family}); last sequence: {self.steps_seen} steps, "
                 f"{self.forwards} forwards in all"]
        if not self.methods:
            lines.append("  (no methods)")
        for name, facts in self.methods.items():
            lines.append(f"  {name}:")
            for key, value in facts.items():
                if key == "per_step" and isinstance(value, list):
                    lines.append(f"    per step ({len(value)}):")
                    lines.extend(f"      {row}" for row in value)
                else:
                    lines.append(f"    {key}: {value}")
        return "\n".join(lines)


def patch(target: Any, *methods: str | MethodConfig, **options: Any) -> Patch:
    """Attach acceleration methods to a diffusers pipeline, a diffusers model or a timm model.

    Methods are names (``"delta-dit"``, ``"delta-dit:interval=3"``) or config objects
    (``accel.DeltaDiTConfig(interval=3)``); keyword options select and configure a method by name
    (``delta_dit={"interval": 3}``). With no method, the family's measured default recipe is used.
    Methods are applied in stage order (prune, quantize, attention, cache); if one fails, everything
    attached so far is removed before the error propagates.

    A target that is already patched is refused: compose all methods in one call, or remove the
    first patch. (Composing two patches would make removal order-dependent.)

    Example::

        p = accel.patch(pipe, "delta-dit")
        images = pipe(class_labels=[3], num_inference_steps=50).images
        print(p.report()); p.remove()
    """
    pipeline, model = resolve_target(target)
    _refuse_patched(model)
    adapter = find_adapter(model)
    requested = list(methods) + _options_to_methods(options)
    if not requested:
        requested = _default_methods(adapter, pipeline)
    items = _order_and_check([resolve_method(item) for item in requested], adapter)
    result = Patch(target, pipeline, model, adapter)
    try:
        for spec, config in items:
            result._attach(spec, config)
        result._install_step_tracking()
        invalidate_registry_caches(model)
        result._install_call_hook()
    except BaseException:
        result.remove()
        raise
    logger.info("accel: patched %s with %s", type(model).__name__, [s.name for s, _ in items])
    return result


def _host_copy(timesteps: Any) -> list[float] | None:
    if isinstance(timesteps, torch.Tensor) and timesteps.dim() == 1:
        return timesteps.detach().float().cpu().tolist()
    return None


def _refuse_patched(model: torch.nn.Module) -> None:
    existing = model.__dict__.get(_PATCH_ATTR)
    if existing is not None:
        raise AlreadyPatchedError(
            f"{type(model).__name__} is already patched by accel ({existing!r}). Pass all methods in one "
            "accel.patch(...) call, or call .remove() (or accel.unpatch(target)) first."
        )


def unpatch(target: Any) -> bool:
    """Remove the accel patch from ``target`` if it has one; returns whether one was removed."""
    _, model = resolve_target(target)
    existing = model.__dict__.get(_PATCH_ATTR)
    if existing is None:
        return False
    existing.remove()
    return True


def active_patch(target: Any) -> Patch | None:
    """The accel patch attached to ``target``, if any."""
    _, model = resolve_target(target)
    return model.__dict__.get(_PATCH_ATTR)
