"""Where tokens sit in one self-attention sequence, and VMoBA's 1D/2D/3D token partitions.

A sequence is ``[prefix tokens][text if prefix][visual frames x height x width][text if suffix]``
(:class:`accel.adapters.base.TokenLayout`). Prefix and text tokens are *special*: every query attends
them and their own queries attend everything (joint text is never dropped). Partitions reorder only the
visual tokens, with an exact permutation (stable sort by chunk id), so chunks that are not contiguous in
raster order (2D tiles across frames, 3D cubes) become contiguous runs; edge chunks are simply smaller
when a dimension does not divide (no padding tokens enter the attention).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch

from accel.adapters.base import TokenLayout


@dataclass(frozen=True)
class SequenceGeometry:
    """Token ranges of one attention sequence of ``length`` tokens."""

    length: int
    frames: int
    height: int
    width: int
    visual_start: int
    special: tuple[tuple[int, int], ...]  # [start, stop) ranges attended by all, attending all

    @property
    def visual_tokens(self) -> int:
        return self.frames * self.height * self.width

    @classmethod
    def from_layout(cls, layout: TokenLayout | None, length: int) -> SequenceGeometry:
        """The geometry of a ``length``-token sequence under ``layout`` (a downsampled level of it for UNet
        and Swin); a 1D run of ``length`` visual tokens when the layout does not describe it."""
        if layout is not None and layout.self_attention_tokens != length:
            try:
                layout = layout.layout_for_tokens(length)
            except ValueError:
                layout = None
        if layout is None:
            return cls(length, 1, 1, length, 0, ())
        joint = layout.text_tokens if layout.text_position in ("prefix", "suffix") else 0
        prefix = layout.prefix_tokens
        special = []
        if prefix:
            special.append((0, prefix))
        visual_start = prefix
        if joint and layout.text_position == "prefix":
            special.append((prefix, prefix + joint))
            visual_start += joint
        if joint and layout.text_position == "suffix":
            special.append((visual_start + layout.visual_tokens, length))
        return cls(length, layout.frames, layout.height, layout.width, visual_start, tuple(special))

    def special_mask(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(S,) bool, True on prefix and joint-text tokens."""
        mask = torch.zeros(self.length, dtype=torch.bool, device=device)
        for start, stop in self.special:
            mask[start:stop] = True
        return mask

    def special_blocks(self, block_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(nb,) bool, True for blocks holding at least one special token."""
        nb = math.ceil(self.length / block_size)
        mask = torch.nn.functional.pad(self.special_mask(device), (0, nb * block_size - self.length))
        return mask.reshape(nb, block_size).any(-1)

    def frame_blocks(self, frames: int, block_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(nb,) bool, True for blocks holding tokens of the first ``frames`` frames (raster order)."""
        nb = math.ceil(self.length / block_size)
        mask = torch.zeros(nb * block_size, dtype=torch.bool, device=device)
        n = min(frames, self.frames) * self.height * self.width
        mask[self.visual_start:self.visual_start + n] = True
        return mask.reshape(nb, block_size).any(-1)


class Partition(str, enum.Enum):
    """How VMoBA cuts a video's tokens into chunks: runs of whole frames, spatial tiles across all frames,
    or spatio-temporal cubes (its layers cycle through them in this order)."""

    ONE_D = "1d"
    TWO_D = "2d"
    THREE_D = "3d"


def chunk_ids(frames: int, height: int, width: int, mode: str, chunk: tuple[int, int, int]) -> torch.Tensor:
    """(F*H*W,) chunk id of each visual token in raster order (frame, row, column).

    ``mode``: ``"1d"`` runs of ``chunk[0]`` whole frames; ``"2d"`` spatial tiles ``chunk[1] x chunk[2]``
    spanning all frames; ``"3d"`` cubes ``chunk[0] x chunk[1] x chunk[2]``. Ids increase in chunk raster
    order, so sorting by them keeps 1D chunks in place.
    """
    ct, ch, cw = (max(1, c) for c in chunk)
    t = torch.arange(frames).view(-1, 1, 1)
    r = torch.arange(height).view(1, -1, 1)
    c = torch.arange(width).view(1, 1, -1)
    nh, nw = math.ceil(height / ch), math.ceil(width / cw)
    if mode not in tuple(Partition):
        raise ValueError(f"partition mode must be one of {', '.join(p.value for p in Partition)}, got {mode!r}.")
    if mode == Partition.ONE_D:
        ids = (t // ct).expand(frames, height, width)
    elif mode == Partition.TWO_D:
        ids = ((r // ch) * nw + c // cw).expand(frames, height, width)
    else:
        ids = ((t // ct) * nh + r // ch) * nw + c // cw
    return ids.reshape(-1)


def partition_permutation(geometry: SequenceGeometry, mode: str, chunk: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(perm, chunk_of_token)`` over the whole sequence: ``x[..., perm, :]`` makes every chunk contiguous
    (special tokens stay where they are, chunk id -1); ``chunk_of_token`` is in permuted order."""
    ids = chunk_ids(geometry.frames, geometry.height, geometry.width, mode, chunk)
    order = torch.argsort(ids, stable=True)
    perm = torch.arange(geometry.length)
    start = geometry.visual_start
    perm[start:start + ids.numel()] = order + start
    chunk_of = torch.full((geometry.length,), -1, dtype=torch.long)
    chunk_of[start:start + ids.numel()] = ids[order]
    return perm, chunk_of


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv
