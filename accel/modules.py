"""Small facts about targets and module trees that every part of accel needs the same way."""

from __future__ import annotations

from typing import Any

import torch

from accel.errors import UnsupportedModelError

#: Where a diffusers pipeline keeps its denoiser.
DENOISER_ATTRS = ("transformer", "unet")


def resolve_target(target: Any) -> tuple[Any | None, torch.nn.Module]:
    """Split a target into ``(pipeline or None, denoiser/model)``; clear error for anything else."""
    if isinstance(target, torch.nn.Module):
        return None, target
    for attr in DENOISER_ATTRS:
        model = getattr(target, attr, None)
        if isinstance(model, torch.nn.Module):
            return target, model
    raise UnsupportedModelError(
        f"accel.patch needs a diffusers pipeline (with a .transformer or .unet), a diffusers model or a "
        f"timm model; got {type(target).__name__}. Load one with accel.pipelines.load(...) or "
        "diffusers.DiffusionPipeline.from_pretrained(...)."
    )


def parent_of(model: torch.nn.Module, path: str) -> tuple[torch.nn.Module, str]:
    """The module holding the sub-module at dotted ``path`` and its attribute name there."""
    parent_path, _, attr = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), attr


def output_tensor(out: Any) -> torch.Tensor:
    """The main tensor of a forward's output: the tensor itself, diffusers' ``.sample``, or the first
    tensor of a tuple/list."""
    if isinstance(out, torch.Tensor):
        return out
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    if isinstance(out, (tuple, list)):
        for item in out:
            if isinstance(item, torch.Tensor):
                return item
    raise TypeError(f"Cannot find the output tensor in a {type(out).__name__}.")
