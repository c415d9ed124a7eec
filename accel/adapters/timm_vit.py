"""timm ``VisionTransformer`` (ViT, DeiT, DeiT-distilled, register ViTs): ``model.blocks`` of ``Block``.

Classifiers, not denoisers: no timestep and a single forward. Tokens are the class/distillation/register
prefix followed by the patch grid; blocks take and return ``x`` (B, N, C).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from accel.adapters.base import BlockInfo, BlockIO, ModelAdapter, Stream, TokenLayout, blocks_from_lists
from accel.errors import UnsupportedModelError
from accel.registry import register_adapter

TIMM_HIDDEN = BlockIO(inputs=(Stream("hidden", "x", 0),), outputs="hidden")
_BRANCHES = {"blocks": {"self_attn": "attn", "ffn": "mlp"}}


def check_timm(model: torch.nn.Module, class_name: str) -> None:
    """Refuse same-named classes from other libraries (torchvision also has a ``VisionTransformer``)."""
    if not any(c.__name__ == class_name and c.__module__.startswith("timm.") for c in type(model).__mro__):
        raise UnsupportedModelError(
            f"{type(model).__name__} ({type(model).__module__}) is not timm's {class_name}; accel's adapter "
            "for that name covers timm models only. Create the model with timm.create_model(...)."
        )


class TimmClassifierAdapter(ModelAdapter):
    """What every timm classifier adapter shares: no timestep, input ``x``, and a check that the model
    really is timm's ``timm_class`` (not a same-named class from another library)."""

    timm_class: ClassVar[str] = ""
    is_denoiser = False
    timestep_arg = None
    sample_arg = "x"
    context_arg = None

    def __init__(self, model: torch.nn.Module) -> None:
        check_timm(model, self.timm_class)
        super().__init__(model)


def patch_grid(patch_embed: torch.nn.Module, image: torch.Tensor) -> tuple[int, int]:
    """The patch grid a timm ``PatchEmbed`` makes of ``image`` (B, C, H, W), honouring dynamic sizes."""
    size = (int(image.shape[-2]), int(image.shape[-1]))
    fixed = tuple(getattr(patch_embed, "img_size", None) or ())
    if fixed == size or not hasattr(patch_embed, "dynamic_feat_size"):
        return tuple(patch_embed.grid_size)
    return tuple(patch_embed.dynamic_feat_size(size))


@register_adapter("VisionTransformer")
class TimmViTAdapter(TimmClassifierAdapter):
    """timm ViT family. DeiT-distilled subclasses ``VisionTransformer`` and is found through the MRO."""

    family = "timm_vit"
    timm_class = "VisionTransformer"

    def blocks(self) -> list[BlockInfo]:
        return blocks_from_lists(self.model, [("blocks", TIMM_HIDDEN)], _BRANCHES)

    def token_layout(self, args: Sequence[Any], kwargs: dict[str, Any]) -> TokenLayout:
        height, width = patch_grid(self.model.patch_embed, self.sample(args, kwargs))
        prefix = int(self.model.num_prefix_tokens)  # class, distillation and register tokens
        return TokenLayout(frames=1, height=height, width=width, prefix_tokens=prefix)
