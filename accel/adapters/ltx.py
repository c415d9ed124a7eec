"""LTX-Video: ``transformer_blocks`` of ``LTXVideoTransformerBlock`` over packed latents.

``hidden_states`` arrives packed, (B, S, C); the forward's ``num_frames``/``height``/``width`` give the token
grid (the pipelines pass the latent grid, which equals the token grid at LTX's patch size 1). Blocks are
called with keywords and return the video stream alone; text enters through ``attn2``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from accel.adapters.base import (
    HIDDEN_ONLY,
    BlockInfo,
    ModelAdapter,
    TokenLayout,
    blocks_from_lists,
    grid_from_positions,
)
from accel.registry import register_adapter

_BRANCHES = {"transformer_blocks": {"self_attn": "attn1", "cross_attn": "attn2", "ffn": "ff"}}


@register_adapter("LTXVideoTransformer3DModel")
class LTXVideoAdapter(ModelAdapter):
    """LTX-Video 0.9.x text/image-to-video transformers."""

    family = "ltx"

    def blocks(self) -> list[BlockInfo]:
        return blocks_from_lists(self.model, [("transformer_blocks", HIDDEN_ONLY)], _BRANCHES)

    def token_layout(self, args: Sequence[Any], kwargs: dict[str, Any]) -> TokenLayout:
        tokens = int(self.sample(args, kwargs).shape[1])  # (B, S, C)
        grid = [self.call_argument(name, args, kwargs) for name in ("num_frames", "height", "width")]
        if any(size is None for size in grid):
            coords = self.call_argument("video_coords", args, kwargs)  # (B, 3, S): frame, row, column
            grid = list(grid_from_positions(coords[0].T)) if coords is not None else [1, 1, tokens]
        frames, height, width = (int(size) for size in grid)
        if frames * height * width != tokens:
            # A latent grid given before patching: divide by the patch sizes.
            p, p_t = self.model.config.patch_size, self.model.config.patch_size_t
            frames, height, width = frames // p_t, height // p, width // p
        return TokenLayout(frames=frames, height=height, width=width,
                           text_tokens=self.context_tokens(args, kwargs), text_position="none")
