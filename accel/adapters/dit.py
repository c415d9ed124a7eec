"""DiT and PixArt-α/Σ: ``transformer_blocks`` of ``BasicTransformerBlock`` over a 2D patch grid."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from accel.adapters.base import HIDDEN_ONLY, BlockInfo, ModelAdapter, TokenLayout, blocks_from_lists
from accel.registry import register_adapter

_BRANCHES = {"transformer_blocks": {"self_attn": "attn1", "cross_attn": "attn2", "ffn": "ff"}}


@register_adapter("DiTTransformer2DModel", "PixArtTransformer2DModel")
class DiTAdapter(ModelAdapter):
    """Class-conditioned DiT (no cross-attention) and text-conditioned PixArt (cross-attention to T5)."""

    family = "dit"

    def blocks(self) -> list[BlockInfo]:
        return blocks_from_lists(self.model, [("transformer_blocks", HIDDEN_ONLY)], _BRANCHES)

    def token_layout(self, args: Sequence[Any], kwargs: dict[str, Any]) -> TokenLayout:
        sample = self.sample(args, kwargs)  # (B, C, H, W)
        patch = self.model.config.patch_size
        return TokenLayout(frames=1, height=sample.shape[-2] // patch, width=sample.shape[-1] // patch,
                           text_tokens=self.context_tokens(args, kwargs), text_position="none")

    def pinned_blocks(self) -> dict[int, str]:
        # adaLN-zero DiT's output layer reads its shift/scale from the first block's norm embedding.
        adaln_zero = self.model.config.get("norm_type") == "ada_norm_zero"
        if type(self.model).__name__ == "DiTTransformer2DModel" and adaln_zero:
            return {0: "its adaLN embedding also conditions DiT's output layer"}
        return {}
