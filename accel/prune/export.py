"""Save a pruned model in its library's own format: diffusers ``save_pretrained`` or a timm folder.

The result loads without accel: ``DiTTransformer2DModel.from_pretrained(folder)``, or for timm
``timm.create_model(**config["kwargs"])`` + ``load_state_dict(safetensors.torch.load_file(...))``
(``accel.pipelines.load(folder)`` reads the same timm folder). Before writing, the model is rebuilt from
its updated config on the meta device and its state-dict keys and shapes are compared, so a config that
cannot describe the pruned model (a UNet whose levels lost different numbers of blocks, SD3 without its
context-pre-only last block) is refused instead of saving a folder that does not reload.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

TIMM_CONFIG = "config.json"
TIMM_WEIGHTS = "model.safetensors"


def _compare(model: torch.nn.Module, rebuilt: torch.nn.Module, how: str) -> None:
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    if want != got:
        missing = sorted(set(want) - set(got))[:5]
        extra = sorted(set(got) - set(want))[:5]
        shapes = sorted(k for k in set(want) & set(got) if want[k] != got[k])[:5]
        raise ValueError(f"{how} does not rebuild the pruned {type(model).__name__}: missing {missing}, "
                         f"unexpected {extra}, other shapes {shapes}. Its config cannot express this pruning; "
                         "use the accel artifact (prune(..., save_to=...)) with accel.patch instead.")


def save_diffusers(model: torch.nn.Module, folder: str | Path) -> Path:
    """``model.save_pretrained(folder)`` after checking that ``from_pretrained`` will rebuild it."""
    with torch.device("meta"):
        rebuilt = type(model).from_config(model.config)
    _compare(model, rebuilt, f"{type(model).__name__}.from_config(config)")
    folder = Path(folder)
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def timm_kwargs_after(kwargs: Mapping[str, Any], lengths: Mapping[str, int]) -> dict[str, Any]:
    """timm create_model kwargs with the block counts of the pruned model (``depth`` or Swin's ``depths``)."""
    out = dict(kwargs)
    if "blocks" in lengths:
        out["depth"] = lengths["blocks"]
    stages = sorted((int(p.split(".")[1]), n) for p, n in lengths.items() if p.startswith("layers."))
    if stages:
        depths = list(out.get("depths", [n for _, n in stages]))
        for stage, n in stages:
            depths[stage] = n
        out["depths"] = tuple(depths)
    return out


def build_timm(kwargs: Mapping[str, Any]) -> torch.nn.Module:
    """A timm model from kwargs: ``model_name`` (``timm.create_model``) or ``class`` ("module:Class")."""
    import importlib

    import timm

    kwargs = dict(kwargs)
    if "model_name" in kwargs:
        return timm.create_model(kwargs.pop("model_name"), pretrained=False, **kwargs)
    module, _, name = kwargs.pop("class").partition(":")
    return getattr(importlib.import_module(module), name)(**kwargs)


def save_timm(model: torch.nn.Module, folder: str | Path, kwargs: Mapping[str, Any]) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (``{"arch": "timm", "kwargs": ...}``, the layout
    ``accel.pipelines.load`` and the embedded digits-vit use). ``kwargs`` already hold the pruned depth."""
    if "model_name" not in kwargs and "class" not in kwargs:
        raise ValueError("Saving a timm model needs its constructor kwargs with 'model_name' (timm.create_model) "
                         "or 'class' ('module:Class'), e.g. timm_kwargs={'model_name': 'vit_tiny_patch16_224', ...}.")
    with torch.device("meta"):
        rebuilt = build_timm(kwargs)
    _compare(model, rebuilt, f"timm with {dict(kwargs)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(folder / TIMM_WEIGHTS))
    config = {"arch": "timm", "kwargs": _jsonable(kwargs)}
    (folder / TIMM_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def load_timm(folder: str | Path) -> torch.nn.Module:
    """Load a folder written by :func:`save_timm` (plain timm + safetensors; shown here as the recipe)."""
    folder = Path(folder)
    config = json.loads((folder / TIMM_CONFIG).read_text())
    model = build_timm(config["kwargs"])
    model.load_state_dict(load_file(str(folder / TIMM_WEIGHTS)), strict=True)
    return model.eval()


def _jsonable(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
