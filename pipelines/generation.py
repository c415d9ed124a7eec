"""Generation adapters the benchmark and demo drive: one call, tensors in [0, 1], per-sample seeds.

    pipe = load("digits-dit")
    images = generate(pipe, labels=[0, 1, 2], seeds=[0, 1, 2], **default_generation_kwargs("digits-dit"))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from accel.pipelines.digits_dit import DigitsDiTPipeline
from accel.pipelines.digits_video import DigitsVideoPipeline

#: Defaults per embedded generator: 50 steps and guidance 4 as in the reported targets; the video runs at
#: 16 frames x 32x32 px = 4,096 tokens so that sparse attention has work to do.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits-dit": {"steps": 50, "guidance_scale": 4.0},
    "digits-video-dit": {"steps": 50, "guidance_scale": 4.0, "num_frames": 16, "height": 32, "width": 32},
}


def default_generation_kwargs(name: str) -> dict[str, Any]:
    """Keyword arguments for ``generate`` that the reported numbers use for an embedded generator."""
    if name not in _DEFAULTS:
        raise ValueError(f"No generation defaults for {name!r}; generators: {', '.join(_DEFAULTS)}.")
    return dict(_DEFAULTS[name])


def _generators(seeds: Sequence[int]) -> list[torch.Generator]:
    # One generator per sample: a sample depends only on its own seed, not on the batch it ran in.
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


@torch.no_grad()
def generate(pipe: Any, labels: Sequence[int], seeds: Sequence[int], steps: int = 50,
             guidance_scale: float = 4.0, **kw: Any) -> torch.Tensor:
    """Runs one batched pipeline call and returns float32 CPU tensors in [0, 1].

    Args:
        pipe: a ``DigitsDiTPipeline`` or ``DigitsVideoPipeline`` (possibly patched by accel).
        labels: class label per sample.
        seeds: noise seed per sample (same length as ``labels``).
        steps: sampler steps.
        guidance_scale: classifier-free guidance weight.
        **kw: passed to the pipeline (e.g. ``num_frames``, ``height``, ``width`` for video).

    Returns:
        Images (N, 1, H, W) or videos (N, F, H, W).
    """
    if len(labels) != len(seeds):
        raise ValueError(f"generate needs one seed per label, got {len(labels)} labels and {len(seeds)} seeds.")
    common = dict(class_labels=list(labels), num_inference_steps=steps, guidance_scale=guidance_scale,
                  generator=_generators(seeds), output_type="pt", **kw)
    if isinstance(pipe, DigitsVideoPipeline):
        return pipe(**common).frames.float().cpu()
    if isinstance(pipe, DigitsDiTPipeline):
        return pipe(**common).images.float().cpu()
    raise TypeError(f"generate supports DigitsDiTPipeline and DigitsVideoPipeline, got {type(pipe).__name__}; "
                    "call other pipelines directly.")


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
