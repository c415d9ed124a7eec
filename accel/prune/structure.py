"""Block removal on any adapter-described model: which blocks may go, a real smaller model, its config.

A block lives in a container (``nn.ModuleList`` in diffusers, ``nn.Sequential`` in timm) whose path is its
name without the last part (``transformer_blocks.5`` -> ``transformer_blocks``, Swin's
``layers.1.blocks.0`` -> ``layers.1.blocks``). Removing blocks replaces each container with a shorter one
of the same type, so the forward (a loop over the container) runs the kept blocks in order and the
state-dict keys renumber themselves: a saved model is an ordinary model with fewer layers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from accel.adapters.base import BlockInfo, ModelAdapter
from accel.modules import parent_of
from accel.registry import find_adapter

#: Config keys that count the blocks of a container, per model family (diffusers ``ConfigMixin`` names).
CONFIG_KEYS: dict[str, str] = {
    "transformer_blocks": "num_layers",
    "single_transformer_blocks": "num_single_layers",
    "blocks": "num_layers",  # Wan; timm ViTs have no config and take ``depth`` in their kwargs
}

Setter = Callable[[Any, str, Any], None]


@dataclass(frozen=True)
class PrunableBlock:
    """One block as pruning sees it: position in execution order, container path and index in it."""

    index: int
    name: str
    container: str
    slot: int
    module: torch.nn.Module
    info: BlockInfo


def prunable_blocks(adapter: ModelAdapter) -> list[PrunableBlock]:
    """Every adapter block with the container it sits in, in execution order."""
    out = []
    for block in adapter.blocks():
        container, _, slot = block.name.rpartition(".")
        if not container or not slot.isdigit():
            raise ValueError(f"Block {block.name!r} of {type(adapter.model).__name__} is not an item of a "
                             "ModuleList/Sequential; hierarchical-prune cannot remove it.")
        out.append(PrunableBlock(len(out), block.name, container, int(slot), block.module, block))
    return out


def pinned_blocks(model: torch.nn.Module, blocks: list[PrunableBlock]) -> dict[int, str]:
    """Blocks that removal would break, with the reason (never chosen, refused when asked for): the
    model family's adapter states them (:meth:`ModelAdapter.pinned_blocks`)."""
    pinned = find_adapter(model).pinned_blocks()
    return {blocks[i].index: reason for i, reason in pinned.items() if 0 <= i < len(blocks)}


def check_removal(model: torch.nn.Module, blocks: list[PrunableBlock], removed: Iterable[int]) -> list[int]:
    """Validate block indices to remove; clear errors for unknown, pinned or all blocks."""
    removed = sorted(set(int(i) for i in removed))
    n = len(blocks)
    bad = [i for i in removed if not 0 <= i < n]
    if bad:
        raise ValueError(f"Block indices {bad} do not exist: {type(model).__name__} has {n} blocks (0..{n - 1}).")
    if len(removed) >= n:
        raise ValueError(f"Removing all {n} blocks of {type(model).__name__} leaves no model; remove at most "
                         f"{n - 1} (ratio < 1).")
    pinned = pinned_blocks(model, blocks)
    for i in removed:
        if i in pinned:
            raise ValueError(f"Block {i} ({blocks[i].name}) cannot be removed: {pinned[i]}. Choose other blocks.")
    return removed


def _shorter(container: torch.nn.Module, items: list[torch.nn.Module]) -> torch.nn.Module:
    """A container of the same kind holding ``items`` (ModuleList or Sequential, as the model expects)."""
    if isinstance(container, torch.nn.Sequential):
        return torch.nn.Sequential(*items)
    if isinstance(container, torch.nn.ModuleList):
        return torch.nn.ModuleList(items)
    raise TypeError(f"Blocks sit in a {type(container).__name__}; hierarchical-prune handles ModuleList and "
                    "Sequential containers.")


def swap_blocks(
    model: torch.nn.Module,
    blocks: list[PrunableBlock],
    removed: Iterable[int],
    replacements: Mapping[int, torch.nn.Module] | None = None,
    setter: Setter = setattr,
) -> dict[str, int]:
    """Replace each container with one holding the kept blocks (``replacements[index]`` instead of the
    original where given). ``setter`` is ``setattr`` for an owned copy, ``HookSet.set_attr`` for a patch
    (undone exactly on removal). Returns the new length of every container."""
    removed_set = set(removed)
    replacements = dict(replacements or {})
    by_container: dict[str, list[PrunableBlock]] = {}
    for block in blocks:
        by_container.setdefault(block.container, []).append(block)
    lengths = {}
    for path, members in by_container.items():
        parent, attr = parent_of(model, path)
        container = getattr(parent, attr)
        kept = [replacements.get(b.index, b.module) for b in members if b.index not in removed_set]
        # Items of the container that the adapter does not list (none today) are kept in place.
        listed = {id(b.module) for b in members}
        extra = [m for m in container if id(m) not in listed]
        if extra:
            raise ValueError(f"{path} holds modules the adapter does not list as blocks; cannot prune it safely.")
        if len(kept) != len(members) or any(b.index in replacements for b in members):
            setter(parent, attr, _shorter(container, kept))
        lengths[path] = len(kept)
    return lengths


def config_updates(model: torch.nn.Module, lengths: Mapping[str, int], removed_positions: Mapping[str, list[int]]
                   ) -> dict[str, Any]:
    """New values of the diffusers config keys that count blocks (``num_layers``, ``num_single_layers``),
    and SD3.5's ``dual_attention_layers`` renumbered. Empty for models without a diffusers config."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "register_to_config"):
        return {}
    updates: dict[str, Any] = {}
    for path, length in lengths.items():
        key = CONFIG_KEYS.get(path)
        if key is not None and key in config and config[key] != length:
            updates[key] = length
    dual = config.get("dual_attention_layers") if hasattr(config, "get") else None
    if dual and "transformer_blocks" in removed_positions:
        gone = set(removed_positions["transformer_blocks"])
        updates["dual_attention_layers"] = tuple(
            i - sum(1 for g in gone if g < i) for i in dual if i not in gone
        )
    return updates


def removed_by_container(blocks: list[PrunableBlock], removed: Iterable[int]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i in removed:
        out.setdefault(blocks[i].container, []).append(blocks[i].slot)
    return out


def set_config(model: torch.nn.Module, updates: Mapping[str, Any], setter: Setter = setattr) -> None:
    """Apply ``updates`` to a diffusers model's frozen config by swapping its ``_internal_dict``."""
    if not updates:
        return
    from diffusers.configuration_utils import FrozenDict

    setter(model, "_internal_dict", FrozenDict({**model._internal_dict, **updates}))


def pruned_copy(model: torch.nn.Module, adapter_factory: Callable[[torch.nn.Module], ModelAdapter],
                removed: Iterable[int]) -> torch.nn.Module:
    """A deep copy of ``model`` without the ``removed`` blocks (config updated): a real smaller model."""
    student = copy.deepcopy(model)
    blocks = prunable_blocks(adapter_factory(student))
    removed = check_removal(student, blocks, removed)
    lengths = swap_blocks(student, blocks, removed)
    set_config(student, config_updates(student, lengths, removed_by_container(blocks, removed)))
    return student


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers (what a checkpoint of the model weighs)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def block_param_fractions(model: torch.nn.Module, blocks: list[PrunableBlock]) -> list[float]:
    """Each block's share of the model's compute, estimated by parameters outside embedding tables (a
    lookup costs nothing). Used for latency budgets when no measured profile is at hand."""

    def compute_params(module: torch.nn.Module) -> int:
        skip = {id(p) for m in module.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
        return sum(p.numel() for p in module.parameters() if id(p) not in skip)

    total = max(1, compute_params(model))
    return [compute_params(b.module) / total for b in blocks]
