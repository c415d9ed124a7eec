"""The alternatives ``accel-bench`` compares accel's methods with: diffusers' caches, cache-dit's DBCache,
ParaAttention's First Block Cache, torchao int8 and a dense-equivalent FlexAttention window.

Each :class:`Baseline` attaches one method to a pipeline (or a bare model) and returns a
:class:`BaselineHandle` that the runner calls around every pipeline call; ``remove()`` restores the
model's object state exactly (every module's ``__dict__``, parameters, buffers and hooks).

diffusers' cache hooks expect the pipeline to open ``transformer.cache_context("cond"/"uncond")``
around each forward; accel's embedded pipelines (and DiT, PixArt, SD3) never do. The handle therefore
owns the context: a pre-forward hook on the denoiser (``accel.baseline.context``) starts a new step when
the timestep changes and names the forwards of one step ``cond``, ``uncond``, ``branch2``... (Wan-style
pipelines run cond and uncond as separate forwards with the same timestep), so every branch keeps its own
cache state. Hooks that keep a single ``state`` (PAB, FasterCache) get one state object per branch too.
``before_call`` resets all state; a timestep that goes up also starts a new sequence.

    handle = BASELINES["fbcache"].apply(pipe, {"threshold": 0.1}, num_inference_steps=50)
    handle.before_call(); images = pipe(...); handle.after_call()
    print(handle.report())  # {"compute_fraction": 0.41, ...}
    handle.remove()
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from accel.config import coerce
from accel.modules import resolve_target
from accel.steps import StepTracker

Settings = dict[str, Any]
_CONTEXT_HOOK = "accel.baseline.context"
_BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks", "layers")


class BaselineHandle:
    """An attached baseline. This base class restores a snapshot and does nothing around calls."""

    def __init__(self, snapshot: _Snapshot) -> None:
        self._snapshot = snapshot

    def before_call(self) -> None:
        """Called right before each pipeline call."""

    def after_call(self) -> None:
        """Called right after each pipeline call (also when it raised)."""

    def report(self) -> dict[str, Any]:
        """Facts about what ran, e.g. ``{"compute_fraction": 0.4}``; ``{}`` when unknown."""
        return {}

    def remove(self) -> None:
        """Detach everything; the model is exactly as before ``apply``. Safe to call twice."""
        self._snapshot.restore()


@dataclass(frozen=True)
class Baseline:
    """A named alternative with default settings and a ``--sweep`` grid (fast .. accurate)."""

    name: str
    summary: str
    defaults: dict[str, Any]
    grid: list[dict[str, Any]]
    attach: Callable[[Any, Settings, int], BaselineHandle] = field(repr=False)
    requirement: Callable[[], str | None] = field(default=lambda: None, repr=False)
    cheap_to_reattach: bool = True  # False where attaching again recompiles (torch.compile'd baselines)

    def available(self) -> str | None:
        """``None`` when usable on this install, else why not."""
        return self.requirement()

    def apply(self, pipe: Any, settings: dict[str, Any], num_inference_steps: int) -> BaselineHandle:
        """Attach to ``pipe`` (a pipeline with ``transformer``/``unet``, or a bare model)."""
        reason = self.available()
        if reason:
            raise RuntimeError(f"Baseline {self.name!r} is not available: {reason}.")
        unknown = sorted(set(settings) - set(self.defaults))
        if unknown:
            raise ValueError(f"{self.name} has no setting(s) {unknown}; accepted: {_keys(self)}.")
        return self.attach(pipe, {**self.defaults, **settings}, num_inference_steps)


def parse_settings(baseline: Baseline, pairs: dict[str, str]) -> dict[str, Any]:
    """Coerce command-line ``key=value`` strings to the type of each setting's default."""
    parsed = {}
    for key, text in pairs.items():
        if key not in baseline.defaults:
            raise ValueError(f"{baseline.name} has no setting {key!r}; accepted: {_keys(baseline)}.")
        parsed[key] = _coerce(baseline.name, key, text, baseline.defaults[key])
    return parsed


def _keys(baseline: Baseline) -> str:
    return ", ".join(sorted(baseline.defaults)) or "none (it takes no settings)"


def _coerce(name: str, key: str, text: str, default: Any) -> Any:
    """A setting read as its default's type, by the same rules as accel's method settings."""
    try:
        return coerce(text.strip(), type(default), f"{name}:{key}")
    except ValueError as exc:
        raise ValueError(f"{exc} Write e.g. {name}:{key}={default}.") from None


def _require(ok: bool, name: str, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}:{key} must be {allowed}, got {value!r}.")


class _Snapshot:
    """Shallow copies of objects' ``__dict__`` and of the dicts/lists inside, put back in place on restore.

    Covers what the baselines change: hook registries and instance ``forward`` (diffusers hooks), swapped
    parameters and ``extra_repr`` (torchao), ``_compiled_call_impl`` (``Module.compile``), torch hooks.
    """

    def __init__(self, root: torch.nn.Module) -> None:
        objects: list[Any] = list(root.modules())
        objects += [m.__dict__["_diffusers_hook"] for m in root.modules() if "_diffusers_hook" in m.__dict__]
        self._records = [(obj, dict(vars(obj)), {k: type(v)(v) for k, v in vars(obj).items()
                                                 if type(v) in _CONTAINERS}) for obj in objects]

    def restore(self) -> None:
        for obj, saved, containers in reversed(self._records):
            vars(obj).clear()
            vars(obj).update(saved)
            for key, content in containers.items():
                box = saved[key]
                if isinstance(box, list):
                    box[:] = content
                else:
                    box.clear()
                    box.update(content)


_CONTAINERS = (dict, list, OrderedDict)  # exact types: diffusers' FrozenDict configs are never mutated


def denoiser_of(target: Any) -> torch.nn.Module:
    return resolve_target(target)[1]


def _block_lists(model: torch.nn.Module, name: str) -> list[str]:
    found = [n for n, child in model.named_children() if n in _BLOCK_LISTS and isinstance(child, torch.nn.ModuleList)]
    if not found:
        raise ValueError(f"{name} needs a block list named one of {_BLOCK_LISTS} on {type(model).__name__}; "
                         "none was found.")
    return found


def _check_block_layout(model: torch.nn.Module, name: str) -> None:
    """Block-level caches need diffusers to know where hidden states sit in a block's output."""
    from diffusers.hooks._helpers import TransformerBlockRegistry

    for list_name in _block_lists(model, name):
        block_cls = type(getattr(model, list_name)[0])
        try:
            TransformerBlockRegistry.get(block_cls)
        except ValueError:
            raise ValueError(f"{name} cannot run on {block_cls.__name__}: diffusers' TransformerBlockRegistry "
                             "does not know its output layout.") from None


class _MacCounter:
    """Linear-layer multiply-accumulates per denoiser forward, to report the fraction actually computed.

    Counts one call (after any MagCache calibration call) and then detaches, so timed calls carry no
    counting overhead; the runner times that same batch. Attention score matmuls are not counted.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self._handles = [m.register_forward_pre_hook(self._count) for m in model.modules()
                         if isinstance(m, torch.nn.Linear)]
        self.forwards: list[list[Any]] = []  # [branch, macs] per denoiser forward

    def _count(self, module: torch.nn.Linear, args: tuple[Any, ...]) -> None:
        if self.forwards:
            self.forwards[-1][1] += args[0].numel() * module.out_features

    def fraction(self) -> float:
        full: dict[str, int] = {}
        for branch, macs in self.forwards:  # the first forward of each branch is always computed in full
            full.setdefault(branch, macs)
        return sum(m for _, m in self.forwards) / max(1, sum(full[b] for b, _ in self.forwards))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def active(self) -> bool:
        return bool(self._handles)


class _CacheHandle(BaselineHandle):
    """Attaches diffusers cache hooks with ``attach(model, timestep_fn)`` and drives their context."""

    def __init__(self, model: torch.nn.Module, attach: Callable[[torch.nn.Module, Callable[[], float]], None],
                 num_inference_steps: int) -> None:
        from diffusers.hooks import HookRegistry, ModelHook

        super().__init__(_Snapshot(model))
        self.model, self.num_inference_steps = model, num_inference_steps
        self._tracker = StepTracker()  # accel's own step/branch logic, so baselines see steps as methods do
        self._branch_name = "cond"
        self._branch_states: dict[tuple[int, str], Any] = {}
        self._fraction: float | None = None
        handle = self

        class ContextHook(ModelHook):
            def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
                handle._on_forward(args, kwargs)
                return args, kwargs

        try:
            attach(model, self._timestep)
            # registered last, so it runs first (outermost), before FasterCache's denoiser hook
            HookRegistry.check_if_exists_or_initialize(model).register_hook(ContextHook(), _CONTEXT_HOOK)
            self._refresh_hooks()
            self._counter = _MacCounter(model)
        except Exception:
            self._snapshot.restore()
            raise

    def _refresh_hooks(self) -> None:
        """Find hooks keeping one ``state`` for all branches; re-run after (re)attaching hooks."""
        from diffusers.hooks import HookRegistry
        from diffusers.hooks.hooks import StateManager

        registry = HookRegistry.check_if_exists_or_initialize(self.model)
        registry.invalidate_child_registries_cache()
        hooks = [h for r in (registry, *registry._get_child_registries()) for h in r.hooks.values()]
        self._single_state_hooks = [h for h in hooks if h._is_stateful and hasattr(h, "state")
                                    and not any(isinstance(v, StateManager) for v in vars(h).values())]

    def _timestep(self) -> float:
        # The first step of a branch always computes: FasterCache would otherwise read an empty cache.
        state = self._tracker.state
        return float("inf") if state.step_index <= 0 or state.timestep is None else state.timestep

    @torch.compiler.disable
    def _on_forward(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        t = float(t.flatten()[0]) if torch.is_tensor(t) else float(t if t is not None else 0.0)
        last = self._tracker.state.timestep
        if last is not None and t > last:  # a new call that skipped before_call
            self.before_call()
        state = self._tracker.begin_forward(t, batch_size=0, layout=None)  # same timestep: next CFG branch
        name = ("cond", "uncond")[state.branch] if state.branch < 2 else f"branch{state.branch}"
        self._branch_name = name
        _set_cache_context(self.model, CacheContext(name, step_index=state.step_index,
                                                    num_inference_steps=self.num_inference_steps, timestep=t))
        for hook in self._single_state_hooks:
            hook.state = self._branch_states.setdefault((id(hook), name), type(hook.state)())
        if self._counter.active:
            self._counter.forwards.append([name, 0])

    def before_call(self) -> None:
        from diffusers.hooks import HookRegistry

        self._finish_call()
        HookRegistry.check_if_exists_or_initialize(self.model).reset_stateful_hooks(recurse=True)
        self._branch_states.clear()
        self._tracker.reset()

    def after_call(self) -> None:
        self._finish_call()

    def _finish_call(self) -> None:
        if self._counter.active and self._counter.forwards:
            self._fraction = self._counter.fraction()
            self._counter.detach()

    def report(self) -> dict[str, Any]:
        return {} if self._fraction is None else {"compute_fraction": round(self._fraction, 4)}

    def remove(self) -> None:
        self._counter.detach()  # torch hook handles hold the counter; the snapshot would drop them anyway
        super().remove()


class _MagCacheHandle(_CacheHandle):
    """MagCache: the first call calibrates (computes everything, records magnitude ratios per step),
    then the hooks are re-attached with those ratios (averaged over CFG branches) and later calls skip.

    The ratios are captured as the tail block records them: diffusers pipelines reset hook state at the
    end of every call (``maybe_free_model_hooks``) on models with ``CacheMixin`` (Wan), dropping them.
    """

    def __init__(self, model: torch.nn.Module, settings: Settings, num_inference_steps: int) -> None:
        from diffusers.hooks import MagCacheConfig, apply_mag_cache
        from diffusers.hooks.mag_cache import _MAG_CACHE_BLOCK_HOOK

        self._settings, self._ratios = settings, {}
        self.mag_ratios: list[float] | None = None
        # a step count never reached, so diffusers neither prints nor clears the ratios at the end
        config = MagCacheConfig(calibrate=True, num_inference_steps=10**9)
        super().__init__(model, lambda m, _: apply_mag_cache(m, config), num_inference_steps)
        tail = next(h for m in model.modules() if "_diffusers_hook" in vars(m)
                    for n, h in m._diffusers_hook.hooks.items() if n == _MAG_CACHE_BLOCK_HOOK and h.is_tail)
        record = tail._perform_calibration_step

        def capture(state: Any, residual: torch.Tensor) -> None:
            record(state, residual)
            self._ratios.setdefault(self._branch_name, []).append(state.calibration_ratios[-1])

        tail._perform_calibration_step = capture

    def _finish_call(self) -> None:
        if self.mag_ratios is None:
            if self._ratios:
                series = list(self._ratios.values())
                length = min(len(r) for r in series)
                self._use_ratios([sum(r[i] for r in series) / len(series) for i in range(length)])
                self._counter.forwards.clear()  # the calibration call skipped nothing
            return
        super()._finish_call()

    def _use_ratios(self, ratios: list[float]) -> None:
        from diffusers.hooks import MagCacheConfig, apply_mag_cache

        s = self._settings
        apply_mag_cache(self.model, MagCacheConfig(
            threshold=s["threshold"], max_skip_steps=s["max_skip_steps"], retention_ratio=s["retention_ratio"],
            num_inference_steps=self.num_inference_steps, mag_ratios=ratios))
        self.mag_ratios = ratios
        self._refresh_hooks()

    def report(self) -> dict[str, Any]:
        return {**super().report(), "calibrated": self.mag_ratios is not None}


def _fbcache(pipe: Any, s: Settings, steps: int) -> BaselineHandle:
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    _require(s["threshold"] >= 0, "fbcache", "threshold", s["threshold"], "a float >= 0")
    model = denoiser_of(pipe)
    _check_block_layout(model, "fbcache")
    config = FirstBlockCacheConfig(threshold=s["threshold"])
    return _CacheHandle(model, lambda m, _: apply_first_block_cache(m, config), steps)


def _taylorseer(pipe: Any, s: Settings, steps: int) -> BaselineHandle:
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

    for key, low in (("interval", 1), ("warmup", 1), ("order", 0)):
        _require(s[key] >= low, "taylorseer", key, s[key], f"an int >= {low}")
    model = denoiser_of(pipe)
    # diffusers' default patterns (fullmatch '^transformer_blocks.*attn') match no DiT/Wan module
    # ('attn1'), so name the attention and feed-forward modules of every block, as the paper caches them.
    patterns = [rf"{name}\.\d+\.(attn\d*|ffn?)" for name in _block_lists(model, "taylorseer")]
    config = TaylorSeerCacheConfig(cache_interval=s["interval"], disable_cache_before_step=s["warmup"],
                                   max_order=s["order"], taylor_factors_dtype=torch.float32,
                                   cache_identifiers=patterns)
    return _CacheHandle(model, lambda m, _: apply_taylorseer_cache(m, config), steps)


def _magcache(pipe: Any, s: Settings, steps: int) -> BaselineHandle:
    _require(s["threshold"] >= 0, "magcache", "threshold", s["threshold"], "a float >= 0")
    _require(s["max_skip_steps"] >= 1, "magcache", "max_skip_steps", s["max_skip_steps"], "an int >= 1")
    _require(0 <= s["retention_ratio"] <= 1, "magcache", "retention_ratio", s["retention_ratio"], "in [0, 1]")
    model = denoiser_of(pipe)
    _check_block_layout(model, "magcache")
    return _MagCacheHandle(model, s, steps)


def _check_attention_skip(name: str, s: Settings, keys: tuple[str, ...]) -> None:
    for key in keys:
        _require(s[key] >= 1, name, key, s[key], "an int >= 1 (1 computes every step)")
    _require(s["t_min"] < s["t_max"], name, "t_max", s["t_max"], f"greater than t_min={s['t_min']}")


def _pab(pipe: Any, s: Settings, steps: int) -> BaselineHandle:
    from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

    _check_attention_skip("pab", s, ("spatial_skip", "cross_skip"))
    window = (s["t_min"], s["t_max"])

    def attach(model: torch.nn.Module, timestep: Callable[[], float]) -> None:
        # Self-attention counts as "spatial" (DiT has no other attention; Wan's attn1 is joint
        # space-time); cross-attention (Wan's attn2) is broadcast over a longer range, as in the paper.
        apply_pyramid_attention_broadcast(model, PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=s["spatial_skip"], cross_attention_block_skip_range=s["cross_skip"],
            spatial_attention_timestep_skip_range=window, cross_attention_timestep_skip_range=window,
            current_timestep_callback=timestep))

    return _CacheHandle(denoiser_of(pipe), attach, steps)


def _fastercache(pipe: Any, s: Settings, steps: int) -> BaselineHandle:
    from diffusers.hooks import FasterCacheConfig, apply_faster_cache

    _check_attention_skip("fastercache", s, ("spatial_skip",))
    weight = s["weight"]

    def attach(model: torch.nn.Module, timestep: Callable[[], float]) -> None:
        # CFG-Cache (skipping the unconditional half) is off (is_guidance_distilled=True): diffusers assumes
        # one batch ordered [uncond, cond] with every conditioning input in its kwargs list; digits-dit
        # batches [cond, uncond] with class_labels, digits-video-dit runs separate forwards. What remains is
        # FasterCache's attention reuse with linear extrapolation, on self-attention.
        apply_faster_cache(model, FasterCacheConfig(
            spatial_attention_block_skip_range=s["spatial_skip"],
            spatial_attention_timestep_skip_range=(s["t_min"], s["t_max"]),
            attention_weight_callback=lambda _: weight, is_guidance_distilled=True,
            current_timestep_callback=timestep))

    return _CacheHandle(denoiser_of(pipe), attach, steps)


def _torchao_missing() -> str | None:
    from accel.extras import MissingExtraError, require

    try:
        require("torchao.quantization", "bench", "the torchao-int8 baseline")
    except MissingExtraError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - a torchao built for another torch fails with anything
        return f"torchao does not import here ({type(exc).__name__}: {exc})"
    return None


class _QuantHandle(BaselineHandle):
    def report(self) -> dict[str, Any]:
        return {"bits": "w8a8-dynamic", "compute_fraction": 1.0}


def _torchao_int8(pipe: Any, s: Settings, steps: int) -> BaselineHandle:
    """Quantize in place (also bare timm models, which cannot be swapped); the snapshot keeps the
    original Parameter objects, so remove() puts back the very same weights."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    model = denoiser_of(pipe)
    handle = _QuantHandle(_Snapshot(model))
    try:
        quantize_(model, Int8DynamicActivationInt8WeightConfig())
        if s["compile"]:
            model.compile()
    except Exception:
        handle.remove()
        raise
    return handle


class _WindowHandle(BaselineHandle):
    """A local-window attention runtime on its own accel patch (which tracks the steps); removal undoes it."""

    def __init__(self, patch: Any, runtime: Any) -> None:
        self._patch, self._runtime = patch, runtime

    def report(self) -> dict[str, Any]:
        facts = self._runtime.report()
        return {"density": facts.get("density")} if "density" in facts else {}

    def remove(self) -> None:
        self._patch.remove()


def _flex_window(pipe: Any, s: Settings, steps: int) -> BaselineHandle:
    """Every query block attends the key blocks within a fixed distance in token order, sized so the
    density matches ``density``: the dense-equivalent pattern a user would write by hand with
    FlexAttention. It rides on accel's attention runtime (same hooks, backends and reports) with no
    data-dependent selection, which is what makes it the baseline for AdaSpa and VMoBA."""
    from accel.api import Patch
    from accel.attention.runtime import Plan, SparseAttentionRuntime

    density = float(s["density"])
    if not 0.0 < density <= 1.0:
        raise ValueError(f"flex-window:density must be in (0, 1], got {density}.")

    class LocalWindow(SparseAttentionRuntime):
        method = "flex-window"
        tables: dict[tuple[int, ...], torch.Tensor] = {}

        def select(self, call: Any) -> Plan:
            # One table per shape, handed again on every call, as a hand-built FlexAttention mask is
            # built once: the runtime then keeps its index lists too.
            B, H, blocks = call.q.shape[0], call.q.shape[1], call.num_blocks
            if (B, H, blocks) not in self.tables:
                radius = max(0, round((density * blocks - 1) / 2))
                index = torch.arange(blocks)
                table = (index[:, None] - index[None, :]).abs() <= radius  # (Qb, Kb)
                self.tables[(B, H, blocks)] = table.expand(B, H, blocks, blocks)
            return Plan(self.tables[(B, H, blocks)])

    patch = Patch.on(pipe)
    try:
        runtime = patch.attach("flex-window", lambda ctx: LocalWindow(ctx, block_size=int(s["block_size"]),
                                                                      backend="auto"))
    except Exception:
        patch.remove()
        raise
    return _WindowHandle(patch, runtime)


def _cache_dit_missing() -> str | None:
    from accel.extras import require

    try:
        require("cache_dit", "peers", "the cache-dit baseline")
    except ImportError as exc:  # not installed, or built against another diffusers
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - cache-dit failing at import is the same as missing
        return f"cache-dit failed to import ({type(exc).__name__}: {exc})"
    return None


class _ClassAttrs:
    """Class attributes another library sets (cache-dit wraps the pipeline *class*'s ``__call__``), put back
    exactly: present ones to their old value, absent ones deleted."""

    def __init__(self, cls: type, names: tuple[str, ...]) -> None:
        self._cls = cls
        self._saved = {name: cls.__dict__.get(name, _MISSING_ATTR) for name in names}

    def restore(self) -> None:
        for name, value in self._saved.items():
            if value is _MISSING_ATTR:
                if name in self._cls.__dict__:
                    delattr(self._cls, name)
            else:
                setattr(self._cls, name, value)


_MISSING_ATTR = object()
_CACHE_DIT_CLASS_ATTRS = ("__call__", "_original_call", "_is_cached")


class _PipelinePeerHandle(BaselineHandle):
    """A peer library that patches a diffusers pipeline *class* (its ``__call__``) as well as the pipeline
    and its denoiser. Subclasses :meth:`attach` and :meth:`detach` the library; this class restores the
    named class attributes, the pipeline's and the model's state exactly, and counts one call's compute."""

    class_attrs: tuple[str, ...] = ()

    def __init__(self, pipe: Any, model: torch.nn.Module) -> None:
        super().__init__(_Snapshot(model))
        self._pipe = pipe
        self._class = _ClassAttrs(type(pipe), self.class_attrs)
        self._pipe_dict = dict(vars(pipe))
        self._fraction: float | None = None
        try:
            self.attach()
        except Exception:
            self.remove()
            raise
        self._counter = _MacCounter(model)
        self._forwards = model.register_forward_pre_hook(self._on_forward)

    def attach(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def detach(self) -> None:
        """The library's own undo, where it has one (the restores in :meth:`remove` follow it)."""

    def _on_forward(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if self._counter.active:
            self._counter.forwards.append(["all", 0])

    def after_call(self) -> None:
        if self._counter.active and self._counter.forwards:
            self._fraction = self._counter.fraction()
            self._counter.detach()
            self._forwards.remove()

    def report(self) -> dict[str, Any]:
        return {} if self._fraction is None else {"compute_fraction": round(self._fraction, 4)}

    def remove(self) -> None:
        if getattr(self, "_counter", None) is not None:
            self._counter.detach()
            self._forwards.remove()
        try:
            self.detach()
        except Exception:  # noqa: BLE001 - never attached, or attached halfway: the restores below undo it
            pass
        self._class.restore()
        vars(self._pipe).clear()
        vars(self._pipe).update(self._pipe_dict)
        super().remove()


class _CacheDitHandle(_PipelinePeerHandle):
    """cache-dit's DBCache (optionally with its TaylorSeer calibrator). cache-dit resets its context at every
    pipeline call by wrapping the pipeline class's ``__call__``; removal calls ``cache_dit.disable_cache``
    first."""

    class_attrs = _CACHE_DIT_CLASS_ATTRS

    def __init__(self, pipe: Any, model: torch.nn.Module, adapter: Any, cache_config: Any,
                 calibrator: Any) -> None:
        self._adapter, self._cache_config, self._calibrator = adapter, cache_config, calibrator
        super().__init__(pipe, model)

    def attach(self) -> None:
        import cache_dit

        cache_dit.enable_cache(self._adapter, cache_config=self._cache_config,
                               calibrator_config=self._calibrator)

    def detach(self) -> None:
        import cache_dit

        cache_dit.disable_cache(self._pipe)


def _cache_dit_adapter(pipe: Any, model: torch.nn.Module) -> Any:
    """cache-dit's own block adapter for the denoiser's family, found by the denoiser's class name (its
    registry is keyed by pipeline names that start like the model's: ``DiT``, ``PixArt``, ``Wan``...), so
    pipelines of other names (accel's digit pipelines) get the family's adapter too."""
    from cache_dit.caching.block_adapters.block_registers import BlockAdapterRegister
    from diffusers import DiffusionPipeline

    if not isinstance(pipe, DiffusionPipeline):
        raise ValueError("cache-dit needs a diffusers pipeline (it resets its cache at every pipeline call); "
                         f"got {type(pipe).__name__}.")
    name = type(model).__name__
    for prefix, factory in BlockAdapterRegister._adapters.items():
        if name.startswith(prefix) or type(pipe).__name__.startswith(prefix):
            return factory(pipe)
    raise ValueError(f"cache-dit has no block adapter for {name} (it supports "
                     f"{', '.join(sorted(BlockAdapterRegister._adapters))}).")


def _cache_dit(pipe: Any, s: Settings, steps: int) -> BaselineHandle:
    from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig

    for key, low in (("fn", 1), ("bn", 0), ("warmup", 0)):
        _require(s[key] >= low, "cache-dit", key, s[key], f"an int >= {low}")
    _require(s["threshold"] >= 0, "cache-dit", "threshold", s["threshold"], "a float >= 0")
    _require(s["order"] >= 0, "cache-dit", "order", s["order"], "an int >= 0 (0: no TaylorSeer)")
    model = denoiser_of(pipe)
    blocks = sum(len(getattr(model, n)) for n in _block_lists(model, "cache-dit"))
    _require(s["fn"] + s["bn"] <= blocks, "cache-dit", "fn + bn", s["fn"] + s["bn"],
             f"at most the model's {blocks} blocks")
    config = DBCacheConfig(Fn_compute_blocks=s["fn"], Bn_compute_blocks=s["bn"],
                           residual_diff_threshold=s["threshold"],
                           max_warmup_steps=s["warmup"], num_inference_steps=steps)
    calibrator = TaylorSeerCalibratorConfig(taylorseer_order=s["order"]) if s["order"] > 0 else None
    return _CacheDitHandle(pipe, model, _cache_dit_adapter(pipe, model), config, calibrator)


def _para_attn_missing() -> str | None:
    from accel.extras import require

    try:
        require("para_attn", "peers", "the para-attn baseline")
        import para_attn.first_block_cache.diffusers_adapters  # noqa: F401 - imports diffusers' pipelines
    except ImportError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - para-attn failing at import is the same as missing
        return f"para-attn failed to import ({type(exc).__name__}: {exc})"
    return None


#: ParaAttention's First Block Cache adapters, by the denoiser's class-name prefix (its own dispatch is
#: by pipeline class name, so pipelines of other names driving these models get the same adapter).
_PARA_ATTN_ADAPTERS = {"Flux": "flux", "Mochi": "mochi", "CogVideoX": "cogvideox",
                       "HunyuanVideo": "hunyuan_video", "Wan": "wan"}


class _ParaAttnHandle(_PipelinePeerHandle):
    """ParaAttention's First Block Cache. It wraps the pipeline *class*'s ``__call__`` (one cache context
    per call) and swaps the transformer's ``forward``; it has no undo of its own."""

    class_attrs = ("__call__", "_is_cached")

    def __init__(self, pipe: Any, model: torch.nn.Module, adapter: str, threshold: float) -> None:
        self._adapter, self._threshold = adapter, threshold
        super().__init__(pipe, model)

    def attach(self) -> None:
        import importlib

        module = importlib.import_module(f"para_attn.first_block_cache.diffusers_adapters.{self._adapter}")
        module.apply_cache_on_pipe(self._pipe, residual_diff_threshold=self._threshold)


def _para_attn(pipe: Any, s: Settings, steps: int) -> BaselineHandle:
    from diffusers import DiffusionPipeline

    _require(s["threshold"] >= 0, "para-attn", "threshold", s["threshold"], "a float >= 0")
    if not isinstance(pipe, DiffusionPipeline):
        raise ValueError("para-attn's First Block Cache needs a diffusers pipeline (it opens its cache "
                         f"context in the pipeline's call); got {type(pipe).__name__}.")
    model = denoiser_of(pipe)
    name = type(model).__name__
    adapter = next((a for prefix, a in _PARA_ATTN_ADAPTERS.items() if name.startswith(prefix)), None)
    if adapter is None:
        raise ValueError(f"para-attn's First Block Cache has no adapter for {name} (it has adapters for "
                         f"{', '.join(_PARA_ATTN_ADAPTERS)} transformers only).")
    return _ParaAttnHandle(pipe, model, adapter, s["threshold"])


_WINDOW = {"t_min": 100, "t_max": 800}

BASELINES: dict[str, Baseline] = {b.name: b for b in [
    Baseline("fbcache", "diffusers FirstBlockCache: skip all blocks after the first while its residual "
             "changes less than `threshold` (relative)", {"threshold": 0.12},  # diffusers' 0.05 skips nothing here
             [{"threshold": t} for t in (0.1, 0.12, 0.15, 0.2, 0.25, 0.3)], _fbcache),
    Baseline("taylorseer", "diffusers TaylorSeer: compute attention/FFN every `interval` steps after `warmup`, "
             "predict them in between by a Taylor series of `order`", {"interval": 5, "warmup": 3, "order": 1},
             [{"interval": i, "order": o} for i, o in ((2, 1), (3, 1), (3, 2), (4, 1), (5, 1), (6, 2), (8, 2))],
             _taylorseer),
    Baseline("magcache", "diffusers MagCache: skip blocks while the accumulated residual-magnitude error is "
             "below `threshold`; the first call calibrates the ratios", {
                 "threshold": 0.06, "max_skip_steps": 3, "retention_ratio": 0.2},
             [{"threshold": t, "max_skip_steps": k} for t, k in
              ((0.01, 1), (0.02, 2), (0.04, 2), (0.06, 3), (0.1, 4), (0.2, 6))], _magcache),
    Baseline("pab", "diffusers Pyramid Attention Broadcast: reuse self-attention for `spatial_skip` steps and "
             "cross-attention for `cross_skip` steps while t_min < t < t_max",
             {"spatial_skip": 2, "cross_skip": 6, **_WINDOW},
             [{"spatial_skip": a, "cross_skip": c, "t_min": lo, "t_max": hi} for a, c, lo, hi in (
                 (2, 4, 100, 600), (2, 6, 100, 800), (3, 6, 100, 800), (3, 8, 50, 950), (4, 8, 50, 950),
                 (6, 10, -1, 1001))], _pab),
    Baseline("fastercache", "diffusers FasterCache (attention part): extrapolate self-attention for "
             "`spatial_skip` steps while t_min < t < t_max, with `weight`",
             {"spatial_skip": 2, "t_min": -1, "t_max": 681, "weight": 0.5},
             [{"spatial_skip": a, "t_max": hi, "weight": w} for a, hi, w in (
                 (2, 500, 0.3), (2, 681, 0.3), (2, 681, 0.5), (3, 800, 0.5), (4, 900, 0.5), (5, 1001, 0.5))],
             _fastercache),
    # Compiled by default: torchao's eager int8 path is one nobody would deploy (tens of times slower than
    # the unquantized model on CPU); compile=False stays available by name.
    Baseline("torchao-int8", "torchao int8 dynamic-activation int8-weight quantization of the denoiser, "
             "torch.compile'd", {"compile": True}, [{"compile": True}], _torchao_int8, _torchao_missing,
             cheap_to_reattach=False),
    # cache-dit's own defaults (F1B0, threshold 0.08); digit models' first-block residual changes 0.3-0.5
    # (relative) per step at 20 steps, so the sweep reaches much higher thresholds.
    Baseline("cache-dit", "cache-dit DBCache: always compute the first `fn` and last `bn` blocks, skip the "
             "middle while the first blocks' residual changes less than `threshold`; `order` > 0 adds its "
             "TaylorSeer calibrator", {"fn": 1, "bn": 0, "threshold": 0.08, "warmup": 4, "order": 0},
             [{"fn": f, "bn": b, "threshold": t, "order": o} for f, b, t, o in (
                 (1, 0, 0.08, 0), (1, 0, 0.2, 0), (1, 0, 0.3, 0), (1, 0, 0.5, 0), (1, 0, 0.3, 1),
                 (1, 0, 0.5, 1), (2, 1, 0.5, 1), (1, 0, 0.8, 1))], _cache_dit, _cache_dit_missing),
    # ParaAttention's documented FBCache setting (0.12 for Wan, 0.08 for FLUX/HunyuanVideo examples).
    Baseline("para-attn", "ParaAttention First Block Cache: skip all blocks after the first while its "
             "residual changes less than `threshold` (relative); Flux, Mochi, CogVideoX, HunyuanVideo, Wan",
             {"threshold": 0.12}, [{"threshold": t} for t in (0.05, 0.08, 0.12, 0.2, 0.3, 0.5)], _para_attn,
             _para_attn_missing),
    Baseline("flex-window", "dense-equivalent local-window attention (fixed band of key blocks at the "
             "given density) on FlexAttention", {"density": 0.3, "block_size": 64},
             [{"density": d} for d in (0.5, 0.3, 0.2, 0.1)], _flex_window),
]}
