"""CogVideoX 1.0 / 1.5: ``transformer_blocks`` of ``CogVideoXBlock`` over latent video frames.

Blocks are called with keywords and return ``(hidden_states, encoder_hidden_states)``. Attention is
joint with the text *before* the video tokens (``CogVideoXAttnProcessor2_0`` concatenates ``[text,
video]``), and one FFN runs over the ``[text, video]`` concatenation, so ``ff`` is the FFN of both streams
(``extra["joint_ffn"]``) and there is no separate ``context_ffn``.

``hidden_states`` is (B, F, C, H, W) with F already the VAE-compressed frame count; CogVideoX 1.0 patches
frames one by one (``patch_size_t=None``), 1.5 groups ``patch_size_t`` frames per token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from accel.adapters.base import BlockInfo, ModelAdapter, TokenLayout
from accel.adapters.hunyuan_video import JOINT_HIDDEN_FIRST
from accel.registry import register_adapter


@register_adapter("CogVideoXTransformer3DModel")
class CogVideoXAdapter(ModelAdapter):
    """CogVideoX text-to-video and image-to-video transformers."""

    family = "cogvideox"

    def blocks(self) -> list[BlockInfo]:
        return [
            BlockInfo(name=f"transformer_blocks.{i}", module=block, group="transformer_blocks", index=i,
                      io=JOINT_HIDDEN_FIRST, self_attn=block.attn1, ffn=block.ff, extra={"joint_ffn": True})
            for i, block in enumerate(self.model.transformer_blocks)
        ]

    def token_layout(self, args: Sequence[Any], kwargs: dict[str, Any]) -> TokenLayout:
        sample = self.sample(args, kwargs)  # (B, F, C, H, W)
        p, p_t = self.model.config.patch_size, self.model.config.patch_size_t or 1
        return TokenLayout(frames=sample.shape[1] // p_t, height=sample.shape[3] // p,
                           width=sample.shape[4] // p, text_tokens=self.context_tokens(args, kwargs),
                           text_position="prefix")
