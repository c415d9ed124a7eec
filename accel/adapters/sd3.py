"""Stable Diffusion 3 / 3.5: ``transformer_blocks`` of ``JointTransformerBlock`` (MM-DiT).

Each block carries two streams, image and text, through one joint attention. ``JointAttnProcessor2_0``
concatenates the text after the image tokens, so text is a suffix of the attention sequence. Blocks
return ``(encoder_hidden_states, hidden_states)``; the last block of SD3 is ``context_pre_only``: it
returns ``None`` for the text stream and has no ``ff_context``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from accel.adapters.base import BlockInfo, BlockIO, ModelAdapter, Stream, TokenLayout
from accel.registry import register_adapter

JOINT_CONTEXT_FIRST = BlockIO(
    inputs=(Stream("hidden", "hidden_states", 0), Stream("context", "encoder_hidden_states", 1)),
    outputs=("context", "hidden"),
)


@register_adapter("SD3Transformer2DModel")
class SD3Adapter(ModelAdapter):
    """SD3 MM-DiT. SD3.5's dual-attention blocks keep their extra image-only attention in
    ``extra["self_attn2"]``."""

    family = "sd3"

    def blocks(self) -> list[BlockInfo]:
        blocks = []
        for i, block in enumerate(self.model.transformer_blocks):
            attn2 = getattr(block, "attn2", None)
            blocks.append(BlockInfo(
                name=f"transformer_blocks.{i}", module=block, group="transformer_blocks", index=i,
                io=JOINT_CONTEXT_FIRST, self_attn=block.attn, ffn=block.ff,
                context_ffn=getattr(block, "ff_context", None),
                extra={"context_pre_only": bool(block.context_pre_only),
                       **({"self_attn2": attn2} if attn2 is not None else {})},
            ))
        return blocks

    def token_layout(self, args: Sequence[Any], kwargs: dict[str, Any]) -> TokenLayout:
        sample = self.sample(args, kwargs)  # (B, C, H, W)
        patch = self.model.config.patch_size
        return TokenLayout(frames=1, height=sample.shape[-2] // patch, width=sample.shape[-1] // patch,
                           text_tokens=self.context_tokens(args, kwargs), text_position="suffix")

    def pinned_blocks(self) -> dict[int, str]:
        # a model saved without it would not reload with its own config
        last = len(self.model.transformer_blocks) - 1
        return {last: "SD3's last block is context_pre_only and differs from the others"} if last >= 0 else {}
