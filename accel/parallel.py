"""accel under diffusers' context parallelism (``model.enable_parallelism(ContextParallelConfig(...))``).

Under context parallelism every rank runs the same denoiser on its own slice of the token sequence, and
the attention layers exchange slices with collectives (Ulysses all-to-all, ring all-gather). Two rules
follow for accel's hooks:

- **Order.** diffusers splits the sequence in a hook on the first block and gathers it in a hook on the
  output projection. accel's hooks on those modules must sit *inside* them (see only the rank's slice),
  whichever of ``accel.patch`` and ``enable_parallelism`` ran first: :func:`register_inside_parallel_hooks`.
- **Agreement.** A block that one rank skips and another runs leaves the other rank waiting in a
  collective for ever. Every decision that depends on data (a schedule built from recorded features)
  is made from statistics pooled over all ranks of the context-parallel group (:func:`gather_records`),
  and :func:`check_agreement` turns a disagreement into a clear error instead of a hang.

Step-indexed schedules (Δ-DiT, a saved BAC schedule) need nothing: every rank sees the same timesteps.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import torch

# diffusers' names for its context-parallel split/gather hooks (hooks/context_parallel.py).
PARALLEL_HOOK_PREFIXES: tuple[str, ...] = ("cp_input---", "cp_output---")


def context_parallel_config(model: torch.nn.Module | None) -> Any | None:
    """The ``ContextParallelConfig`` the model (or any sub-module) runs under, or ``None``."""
    if model is None:
        return None
    for module in model.modules():
        config = getattr(module, "_parallel_config", None)
        cp = getattr(config, "context_parallel_config", None)
        if cp is not None:
            return cp
    return None


def context_parallel_group(model: torch.nn.Module | None) -> Any | None:
    """The process group spanning the model's context-parallel ranks, or ``None`` when it runs alone."""
    cp = context_parallel_config(model)
    mesh = getattr(cp, "_flattened_mesh", None)
    if mesh is None or mesh.size() <= 1:
        return None
    return mesh.get_group()


def register_inside_parallel_hooks(registry: Any, hook: Any, name: str) -> None:
    """Register ``hook`` in a diffusers ``HookRegistry`` beneath any context-parallel hooks there.

    ``register_hook`` makes the new hook the outermost; when diffusers' split/gather hooks are already on
    the module they are taken off and put back on top (in their order), so they still split before and
    gather after everything accel does."""
    outer = [n for n in registry._hook_order if n.startswith(PARALLEL_HOOK_PREFIXES)]
    held = [(n, registry.hooks[n]) for n in outer]
    for n in reversed(outer):
        registry.remove_hook(n, recurse=False)
    registry.register_hook(hook, name)
    for n, h in held:
        registry.register_hook(h, n)


def gather_records(tree: Any, group: Any | None) -> Any:
    """A nest of dicts and lists of arrays, with each array replaced by that array from every rank of
    ``group`` concatenated along its last axis in rank order (``tree`` itself when running alone).

    Every rank gets the same result, so whatever is computed from it next is the same everywhere. Every
    rank must call it at the same point (it is a collective)."""
    if group is None:
        return tree
    import torch.distributed as dist

    parts: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, tree, group=group)
    return _concatenate(parts)


def _concatenate(parts: list[Any]) -> Any:
    first = parts[0]
    if isinstance(first, dict):
        if any(set(p) != set(first) for p in parts):
            raise RuntimeError("accel: the ranks of the context-parallel group recorded different "
                               "calibration data (keys differ); every rank must run the same calls.")
        return {key: _concatenate([p[key] for p in parts]) for key in first}
    if isinstance(first, (list, tuple)):
        if any(len(p) != len(first) for p in parts):
            raise RuntimeError("accel: the ranks of the context-parallel group recorded different numbers of "
                               "calibration runs; every rank must run the same calls.")
        return type(first)(_concatenate(list(items)) for items in zip(*parts))
    return np.concatenate([np.asarray(p) for p in parts], axis=-1)


def broadcast_from_first(value: Any, group: Any | None) -> Any:
    """``value`` as the group's first rank holds it, on every rank (``value`` itself when running alone).

    For choices made by measurement on each rank (kernel timings), which may differ between ranks."""
    if group is None:
        return value
    import torch.distributed as dist

    holder = [value]
    dist.broadcast_object_list(holder, group=group, group_src=0)
    return holder[0]


def carries_parallel_hooks(module: torch.nn.Module) -> bool:
    """Whether diffusers attached a context-parallel split/gather hook to ``module`` itself."""
    registry = module.__dict__.get("_diffusers_hook")
    return registry is not None and any(n.startswith(PARALLEL_HOOK_PREFIXES) for n in registry.hooks)


def fingerprint(value: Any) -> str:
    """A short digest of a JSON-able decision (a schedule, a plan), equal exactly when the values are."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_agreement(what: str, value: Any, group: Any | None) -> None:
    """Raise a clear error unless every rank of ``group`` holds the same ``value``."""
    if group is None:
        return
    import torch.distributed as dist

    digests: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(digests, fingerprint(value), group=group)
    if len(set(digests)) > 1:
        raise RuntimeError(
            f"accel: the ranks of the context-parallel group disagree on {what} (digests {digests}); "
            "every rank must make the same caching decision or the collectives inside attention hang. "
            "Calibrate without context parallelism and pass the saved schedule, or report this as a bug."
        )
