"""accel.pipelines: loading models and the embedded models that ship with accel.

    from accel.pipelines import load, generate, default_generation_kwargs
    pipe = load("digits-pixart")                     # no network needed; a plain diffusers PixArtAlphaPipeline
    images = generate(pipe, ["a thick handwritten 7, slanted right"], seeds=[0], steps=20)  # (1, 1, 32, 32)

Embedded: ``digits-pixart`` (diffusers' PixArt-α pipeline: AutoencoderKL, T5 encoder, PixArt transformer;
captioned 32x32 digits, the default), ``digits-dit`` (DiTTransformer2DModel, 16x16 digits),
``digits-video-dit`` (WanTransformer3DModel, bouncing digits, 16 frames x 32x32 = 4,096 tokens),
``digits-vit`` (timm ViT classifier), ``digits-judge`` (CNN that scores digit-DiT samples) and
``digits-pixart-judge`` (the same CNN on digits-pixart's canvases). Training scripts live in
``accel.pipelines.train``.
"""

from __future__ import annotations

from accel.pipelines.digits_dit import DigitsDiTPipeline, DigitsImageOutput
from accel.pipelines.digits_video import DigitLabelEmbedder, DigitsVideoOutput, DigitsVideoPipeline
from accel.pipelines.generation import (classification_set, default_generation_kwargs, generate,
                                        reported_setting)
from accel.pipelines.loading import EMBEDDED, WEIGHTS_DIR, HubUnreachableError, hub_reachable, load

__all__ = [
    "EMBEDDED", "WEIGHTS_DIR", "DigitLabelEmbedder", "DigitsDiTPipeline", "DigitsImageOutput",
    "DigitsVideoOutput", "DigitsVideoPipeline", "HubUnreachableError", "classification_set",
    "default_generation_kwargs", "generate", "hub_reachable", "load", "reported_setting",
]
