"""Flux.1: 19 double-stream ``transformer_blocks`` then 38 ``single_transformer_blocks`` (MM-DiT).

Both kinds are called with ``hidden_states=..., encoder_hidden_states=...`` and return
``(encoder_hidden_states, hidden_states)``. Double blocks attend jointly with the text *before* the image
tokens (``FluxAttnProcessor`` concatenates ``[text, image]``); single blocks concatenate ``[text, image]``
themselves and run one self-attention over it, with a parallel MLP (``proj_mlp``) fused into ``proj_out``:
that MLP is no separable branch, so single blocks expose ``ffn=None``.

Latents arrive packed, ``hidden_states`` (B, S, C), with ``img_ids`` (S, 3) holding each token's
(index, row, column); the grid is read from the ids.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from accel.adapters.base import BlockInfo, ModelAdapter, TokenLayout, blocks_from_lists, grid_from_positions
from accel.adapters.sd3 import JOINT_CONTEXT_FIRST
from accel.registry import register_adapter

_BRANCHES = {
    "transformer_blocks": {"self_attn": "attn", "ffn": "ff", "context_ffn": "ff_context"},
    "single_transformer_blocks": {"self_attn": "attn"},
}


@register_adapter("FluxTransformer2DModel")
class FluxAdapter(ModelAdapter):
    """Flux.1 dev/schnell (and Kontext, whose reference-image tokens extend the image sequence)."""

    family = "flux"

    def blocks(self) -> list[BlockInfo]:
        return blocks_from_lists(self.model, [(group, JOINT_CONTEXT_FIRST) for group in _BRANCHES], _BRANCHES)

    def token_layout(self, args: Sequence[Any], kwargs: dict[str, Any]) -> TokenLayout:
        sample = self.sample(args, kwargs)  # (B, S, C), packed patches
        tokens = int(sample.shape[1])
        frames, height, width = 1, 1, tokens
        img_ids = self.call_argument("img_ids", args, kwargs)
        if img_ids is not None:
            _, rows, cols = grid_from_positions(img_ids)  # ids: (index, row, column)
            if rows * cols == tokens:
                height, width = rows, cols
        elif math.isqrt(tokens) ** 2 == tokens:
            height = width = math.isqrt(tokens)
        # Otherwise (e.g. Kontext's reference tokens of another size) the sequence is no single grid:
        # report it as one row rather than guess.
        return TokenLayout(frames=frames, height=height, width=width,
                           text_tokens=self.context_tokens(args, kwargs), text_position="prefix")
