"""One generation driver for any diffusers pipeline: the call is built from the pipeline's own
``__call__`` signature, outputs come back as float tensors in [0, 1].

    pipe = load("/models/pixart-512")                         # any local diffusers folder
    images = generate(pipe, ["a red fox", "a lighthouse"], seeds=[0, 1], steps=20)   # (2, 3, H, W)
    pipe = load("digits-dit")
    images = generate(pipe, [3, 7], seeds=[0, 1], **default_generation_kwargs("digits-dit"))  # (2, 1, 16, 16)

Conditions are prompts (``str``) for text-conditioned pipelines and class labels (``int``) for
class-conditional ones (diffusers' ``DiTPipeline``, the embedded digit models). Each sample gets its own
``torch.Generator``, so a sample depends only on its seed, not on the batch it ran in. Images come back
(N, C, H, W), videos (N, F, C, H, W).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from accel.calls import (  # noqa: F401 - re-exported: the driver's public names
    DEFAULT_PROMPTS,
    CallSignature,
    Condition,
    UnsupportedPipelineError,
    as_tensor_output,
    build_call,
    call_signature,
    folder_prompts,
    run_call,
)

#: Defaults per embedded generator, as in the reported targets: digits-pixart 20 steps (PixArt's usual count)
#: at PixArt's default guidance, the digit DiTs 50 steps at guidance 4; the video runs at 16 frames x 32x32
#: px = 4,096 tokens so that sparse attention has work to do.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits-pixart": {"steps": 20, "guidance_scale": 4.5},
    "digits-dit": {"steps": 50, "guidance_scale": 4.0},
    "digits-video-dit": {"steps": 50, "guidance_scale": 4.0, "num_frames": 16, "height": 32, "width": 32},
}


def default_generation_kwargs(name: str) -> dict[str, Any]:
    """Keyword arguments for ``generate`` that the reported numbers use for an embedded generator."""
    if name not in _DEFAULTS:
        raise ValueError(f"No generation defaults for {name!r}; generators: {', '.join(_DEFAULTS)}.")
    return dict(_DEFAULTS[name])


def reported_setting(name: str | None, key: str, default: Any) -> Any:
    """One setting (``"steps"``, ``"guidance_scale"``) that the reported numbers of embedded generator
    ``name`` use; ``default`` for other models (local folders, hub ids) and settings they leave open."""
    return _DEFAULTS.get(name or "", {}).get(key, default)


@torch.no_grad()
def generate(
    pipe: Any,
    conditions: Sequence[Condition],
    seeds: Sequence[int],
    steps: int | None = None,
    guidance_scale: float | None = None,
    **kw: Any,
) -> torch.Tensor:
    """Runs one batched pipeline call and returns float32 CPU tensors in [0, 1].

    Args:
        pipe: any diffusers pipeline taking ``prompt`` or ``class_labels`` (possibly patched by accel).
        conditions: one prompt (str) or class label (int) per sample.
        seeds: noise seed per sample (same length as ``conditions``).
        steps: sampler steps (``None``: the pipeline's default).
        guidance_scale: classifier-free guidance weight (``None``: the pipeline's default).
        **kw: ``negative_prompt``, ``height``, ``width``, ``num_frames`` (passed where the pipeline takes
            them) and any other keyword of the pipeline's call.

    Returns:
        Images (N, C, H, W) or videos (N, F, C, H, W).
    """
    return run_call(pipe, build_call(pipe, conditions, seeds, steps, guidance_scale, **kw))


def classification_set(name: str, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out images (N, 1, 16, 16) in [0, 1] and labels (N,) for an embedded classifier.

    Only the digit classifiers have an offline evaluation set; other classifiers (e.g. ImageNet timm models)
    need a user-provided dataset.
    """
    from accel.pipelines.data import load_digit_images

    if name not in ("digits-vit", "digits-judge"):
        raise ValueError(f"No offline evaluation set for {name!r}; available for 'digits-vit' and 'digits-judge'. "
                         "Pass your own images and labels to accel.metrics.top1 instead.")
    return load_digit_images(16, split)
