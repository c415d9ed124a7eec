"""timm ``SwinTransformer``: every ``SwinTransformerBlock`` across the stages (``model.layers``).

Hierarchical: stage ``i`` works on the patch grid downsampled by ``2**i`` (patch merging at the start of
each later stage), recorded as ``extra["downsample"]``. Attention is windowed: each block attends within
``extra["window_size"]`` windows, cyclically shifted by ``extra["shift_size"]``, so the attention module
sees (B * windows, window_h * window_w, C). Blocks take and return ``x`` (B, H, W, C).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from accel.adapters.base import BlockInfo, TokenLayout
from accel.adapters.timm_vit import TIMM_HIDDEN, TimmClassifierAdapter, patch_grid
from accel.registry import register_adapter


@register_adapter("SwinTransformer")
class TimmSwinAdapter(TimmClassifierAdapter):
    """timm Swin (v1) classifiers."""

    family = "timm_swin"
    timm_class = "SwinTransformer"

    def blocks(self) -> list[BlockInfo]:
        blocks: list[BlockInfo] = []
        factor = 1
        for stage_index, stage in enumerate(self.model.layers):
            if not isinstance(getattr(stage, "downsample", None), torch.nn.Identity | None):
                factor *= 2  # patch merging at the stage's start
            for i, block in enumerate(stage.blocks):
                blocks.append(BlockInfo(
                    name=f"layers.{stage_index}.blocks.{i}", module=block, group=f"layers.{stage_index}",
                    index=len(blocks), io=TIMM_HIDDEN, self_attn=block.attn, ffn=block.mlp,
                    extra={"stage": stage_index, "downsample": factor,
                           "window_size": tuple(block.window_size), "shift_size": tuple(block.shift_size)},
                ))
        return blocks

    def token_layout(self, args: Sequence[Any], kwargs: dict[str, Any]) -> TokenLayout:
        height, width = patch_grid(self.model.patch_embed, self.sample(args, kwargs))
        return TokenLayout(frames=1, height=height, width=width)
