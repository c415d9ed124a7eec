"""Wan 2.1 / 2.2: ``blocks`` of ``WanTransformerBlock`` over a 3D patch grid.

Blocks are called positionally, ``block(hidden_states, encoder_hidden_states, temb, rotary_emb)``, and
return the image stream alone; text (and, for I2V, image-encoder tokens) enters through ``attn2``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from accel.adapters.base import HIDDEN_ONLY, BlockInfo, ModelAdapter, TokenLayout, blocks_from_lists
from accel.registry import register_adapter

_BRANCHES = {"blocks": {"self_attn": "attn1", "cross_attn": "attn2", "ffn": "ffn"}}


@register_adapter("WanTransformer3DModel")
class WanAdapter(ModelAdapter):
    """Wan text-to-video and image-to-video transformers (3D RoPE, cross-attention to UMT5)."""

    family = "wan"

    def blocks(self) -> list[BlockInfo]:
        return blocks_from_lists(self.model, [("blocks", HIDDEN_ONLY)], _BRANCHES)

    def token_layout(self, args: Sequence[Any], kwargs: dict[str, Any]) -> TokenLayout:
        sample = self.sample(args, kwargs)  # (B, C, F, H, W)
        p_t, p_h, p_w = self.model.config.patch_size
        return TokenLayout(frames=sample.shape[2] // p_t, height=sample.shape[3] // p_h,
                           width=sample.shape[4] // p_w, text_tokens=self.context_tokens(args, kwargs),
                           text_position="none")
