"""SD 1.x/2.x and SDXL UNets: every ``BasicTransformerBlock`` inside the down, mid and up blocks.

A UNet's transformer blocks sit at several resolutions. ``token_layout`` gives the grid at the model input
(the latent's height x width, one token per latent pixel) and each block records its level's
``extra["downsample"]`` factor, so :meth:`ModelAdapter.block_layout` (or
:meth:`TokenLayout.layout_for_tokens` from a sequence length) gives the grid a block sees. Caching methods
use these blocks; there is no patch grid or joint text (text enters through ``attn2``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from accel.adapters.base import HIDDEN_ONLY, BlockInfo, ModelAdapter, TokenLayout
from accel.registry import register_adapter

_BLOCK_CLASS = "BasicTransformerBlock"


def _transformer_blocks(module: torch.nn.Module, prefix: str) -> Iterator[tuple[str, torch.nn.Module]]:
    # Within one down/mid/up block, registration order of `attentions` is execution order.
    for name, sub in module.named_modules(prefix=prefix):
        if type(sub).__name__ == _BLOCK_CLASS:
            yield name, sub


@register_adapter("UNet2DConditionModel")
class UNetAdapter(ModelAdapter):
    """Text-conditioned UNets (SD 1.5, SD 2.1, SDXL). The model registers ``up_blocks`` before
    ``mid_block``, so blocks are collected level by level in the order the forward runs them."""

    family = "unet"
    sequential_blocks = False  # transformer blocks sit at several resolutions, between resnets
    sample_arg = "sample"

    def blocks(self) -> list[BlockInfo]:
        blocks: list[BlockInfo] = []
        factor = 1

        def add(group: str, level: torch.nn.Module, prefix: str) -> None:
            for name, block in _transformer_blocks(level, prefix):
                blocks.append(BlockInfo(
                    name=name, module=block, group=group, index=len(blocks), io=HIDDEN_ONLY,
                    self_attn=block.attn1, cross_attn=getattr(block, "attn2", None), ffn=block.ff,
                    extra={"downsample": factor},
                ))

        for i, level in enumerate(self.model.down_blocks):
            add("down_blocks", level, f"down_blocks.{i}")
            if getattr(level, "downsamplers", None) is not None:
                factor *= 2
        if self.model.mid_block is not None:
            add("mid_block", self.model.mid_block, "mid_block")
        for i, level in enumerate(self.model.up_blocks):
            add("up_blocks", level, f"up_blocks.{i}")
            if getattr(level, "upsamplers", None) is not None:
                factor //= 2
        return blocks

    def token_layout(self, args: Sequence[Any], kwargs: dict[str, Any]) -> TokenLayout:
        sample = self.sample(args, kwargs)  # (B, C, H, W)
        return TokenLayout(frames=1, height=sample.shape[-2], width=sample.shape[-1],
                           text_tokens=self.context_tokens(args, kwargs), text_position="none")

    def default_recipe(self) -> tuple[str, ...]:
        # The blocks are no single residual chain, so the stack-Δ default cannot apply; BAC's own
        # per-branch caching (its paper evaluates UNets) reuses each attention/FFN output instead.
        return ("bac:granularity=branch:weighting=snr:update_fraction=0.5",)
