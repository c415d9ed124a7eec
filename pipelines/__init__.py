"""accel.pipelines: loading models and the embedded models that ship with accel.

    from accel.pipelines import load, generate, default_generation_kwargs
    pipe = load("digits-dit")                        # no network needed
    images = generate(pipe, [3, 7], seeds=[0, 1], **default_generation_kwargs("digits-dit"))  # (2, 1, 16, 16)

Embedded: ``digits-dit`` (DiTTransformer2DModel, 16x16 digits), ``digits-video-dit`` (WanTransformer3DModel,
bouncing digits, 16 frames x 32x32 = 4,096 tokens), ``digits-vit`` (timm ViT classifier) and
``digits-judge`` (CNN that scores generated digits). Training scripts live in ``accel.pipelines.train``.
"""

from __future__ import annotations

from accel.pipelines.digits_dit import DigitsDiTPipeline, DigitsImageOutput
from accel.pipelines.digits_video import DigitLabelEmbedder, DigitsVideoOutput, DigitsVideoPipeline
from accel.pipelines.generation import classification_set, default_generation_kwargs, generate
from accel.pipelines.loading import EMBEDDED, WEIGHTS_DIR, HubUnreachableError, hub_reachable, load

__all__ = [
    "EMBEDDED", "WEIGHTS_DIR", "DigitLabelEmbedder", "DigitsDiTPipeline", "DigitsImageOutput", "DigitsVideoOutput",
    "DigitsVideoPipeline", "HubUnreachableError", "classification_set", "default_generation_kwargs", "generate", "hub_reachable", "load",
]
