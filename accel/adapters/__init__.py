"""Model-family adapters, looked up by model class along the MRO (see accel.registry.find_adapter)."""

from accel.adapters.base import BlockInfo, BlockIO, ModelAdapter, Stream, TokenLayout
from accel.adapters import (  # noqa: F401  (each module registers its adapter)
    cogvideox,
    dit,
    flux,
    hunyuan_video,
    ltx,
    sd3,
    timm_swin,
    timm_vit,
    unet,
    wan,
)

__all__ = ["BlockIO", "BlockInfo", "ModelAdapter", "Stream", "TokenLayout"]
