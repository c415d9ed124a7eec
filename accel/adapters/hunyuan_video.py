"""HunyuanVideo: double-stream ``transformer_blocks`` then ``single_transformer_blocks``.

Both kinds are called positionally, ``block(hidden_states, encoder_hidden_states, temb, mask, rope, ...)``,
and return ``(hidden_states, encoder_hidden_states)`` (image first, unlike Flux and SD3). Attention is
joint with the text *after* the video tokens (``HunyuanVideoAttnProcessor2_0`` concatenates
``[video, text]``; single blocks split their ``[video, text]`` concatenation before the attention).
Single blocks fuse a parallel MLP (``proj_mlp``) into ``proj_out``, so they expose ``ffn=None``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from accel.adapters.base import BlockInfo, BlockIO, ModelAdapter, Stream, TokenLayout, blocks_from_lists
from accel.registry import register_adapter

JOINT_HIDDEN_FIRST = BlockIO(
    inputs=(Stream("hidden", "hidden_states", 0), Stream("context", "encoder_hidden_states", 1)),
    outputs=("hidden", "context"),
)

_BRANCHES = {
    "transformer_blocks": {"self_attn": "attn", "ffn": "ff", "context_ffn": "ff_context"},
    "single_transformer_blocks": {"self_attn": "attn"},
}


@register_adapter("HunyuanVideoTransformer3DModel")
class HunyuanVideoAdapter(ModelAdapter):
    """HunyuanVideo text-to-video (and the token-replace I2V variant, which shares the layout)."""

    family = "hunyuan_video"

    def blocks(self) -> list[BlockInfo]:
        return blocks_from_lists(self.model, [(group, JOINT_HIDDEN_FIRST) for group in _BRANCHES], _BRANCHES)

    def token_layout(self, args: Sequence[Any], kwargs: dict[str, Any]) -> TokenLayout:
        sample = self.sample(args, kwargs)  # (B, C, F, H, W)
        p, p_t = self.model.config.patch_size, self.model.config.patch_size_t
        # Padded prompt tokens are masked in the attention but still occupy the sequence.
        return TokenLayout(frames=sample.shape[2] // p_t, height=sample.shape[3] // p,
                           width=sample.shape[4] // p, text_tokens=self.context_tokens(args, kwargs),
                           text_position="suffix")
