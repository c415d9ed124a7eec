"""What every method needs to know about a model family, in one small object per family.

An adapter maps a model class to: its blocks in execution order; each block's self-attention,
cross-attention and FFN sub-modules; how a block reads and writes its hidden-state streams (image
tokens, and text tokens for joint-attention blocks); the token layout of the current input; and the
timestep argument. Methods read adapters, never model internals.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch


@dataclass(frozen=True)
class TokenLayout:
    """The token grid of the current input, as the attention modules see it.

    ``frames x height x width`` visual patch tokens (``frames=1`` for images). ``text_tokens`` is the
    number of text tokens concatenated into the self-attention sequence (joint attention) and
    ``text_position`` where they sit (``"prefix"``, ``"suffix"`` or ``"none"`` when text only enters
    through cross-attention). ``prefix_tokens`` are other tokens before the visual ones (ViT class or
    register tokens).
    """

    frames: int
    height: int
    width: int
    text_tokens: int = 0
    text_position: str = "none"
    prefix_tokens: int = 0

    @property
    def visual_tokens(self) -> int:
        return self.frames * self.height * self.width

    @property
    def self_attention_tokens(self) -> int:
        """Sequence length inside the self-attention (joint text included)."""
        joint_text = self.text_tokens if self.text_position in ("prefix", "suffix") else 0
        return self.prefix_tokens + self.visual_tokens + joint_text

    def downsampled(self, factor: int) -> TokenLayout:
        """The layout after ``factor``-fold spatial downsampling (UNet levels, Swin stages).

        Sizes round up, as stride-2 convolutions with padding 1 and timm's padded patch merging do.
        """
        if factor < 1:
            raise ValueError(f"TokenLayout.downsampled needs a factor >= 1, got {factor}.")
        if factor == 1:
            return self
        return replace(self, height=-(-self.height // factor), width=-(-self.width // factor))

    def layout_for_tokens(self, n: int) -> TokenLayout:
        """The layout at the downsampling level whose attention sequence has ``n`` tokens.

        ``self`` is the layout at the model's input resolution; factors 1, 2, 4, ... are tried, so an
        attention hook inside a UNet level or a Swin stage can recover its grid from ``hidden.shape[1]``.
        """
        factor = 1
        while True:
            layout = self.downsampled(factor)
            if layout.self_attention_tokens == n:
                return layout
            if layout.height == 1 and layout.width == 1:
                break
            factor *= 2
        raise ValueError(
            f"No downsampling level of {self} has {n} tokens (tried factors 1..{factor}); "
            "the sequence does not come from this input."
        )


@dataclass(frozen=True)
class Stream:
    """One hidden-state stream of a block: where it enters (kwarg name / position) and leaves."""

    name: str
    arg: str
    position: int


@dataclass(frozen=True)
class BlockIO:
    """How a block's forward carries its streams.

    ``inputs``: the streams read from the call. ``outputs``: the order of streams in a tuple output, or
    a single name when the block returns one tensor.
    """

    inputs: tuple[Stream, ...]
    outputs: tuple[str, ...] | str

    def read_inputs(self, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, torch.Tensor | None]:
        streams = {}
        for stream in self.inputs:
            if stream.arg in kwargs:
                streams[stream.name] = kwargs[stream.arg]
            elif stream.position < len(args):
                streams[stream.name] = args[stream.position]
            else:
                streams[stream.name] = None
        return streams

    def read_outputs(self, output: Any) -> dict[str, torch.Tensor | None]:
        if isinstance(self.outputs, str):
            return {self.outputs: output}
        return dict(zip(self.outputs, output))

    def make_output(self, streams: dict[str, torch.Tensor | None]) -> Any:
        if isinstance(self.outputs, str):
            return streams[self.outputs]
        return tuple(streams.get(name) for name in self.outputs)


HIDDEN_ONLY = BlockIO(inputs=(Stream("hidden", "hidden_states", 0),), outputs="hidden")


@dataclass(frozen=True)
class BlockInfo:
    """One transformer block and its residual branches."""

    name: str
    module: torch.nn.Module
    group: str
    index: int
    io: BlockIO
    self_attn: torch.nn.Module | None = None
    cross_attn: torch.nn.Module | None = None
    ffn: torch.nn.Module | None = None
    context_ffn: torch.nn.Module | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def branches(self) -> dict[str, torch.nn.Module]:
        """Residual branches by kind: ``self_attn``, ``cross_attn``, ``ffn``, ``context_ffn`` (present ones)."""
        named = {
            "self_attn": self.self_attn,
            "cross_attn": self.cross_attn,
            "ffn": self.ffn,
            "context_ffn": self.context_ffn,
        }
        return {kind: module for kind, module in named.items() if module is not None}


class ModelAdapter:
    """Base adapter. Subclasses set ``family`` and implement ``blocks`` and ``token_layout``."""

    family: ClassVar[str] = "unknown"
    is_denoiser: ClassVar[bool] = True
    sequential_blocks: ClassVar[bool] = True  # blocks form one residual chain (Δ-DiT needs it)
    timestep_arg: ClassVar[str | None] = "timestep"
    sample_arg: ClassVar[str] = "hidden_states"
    context_arg: ClassVar[str | None] = "encoder_hidden_states"

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._signature = inspect.signature(type(model).forward)

    def blocks(self) -> list[BlockInfo]:
        raise NotImplementedError

    def token_layout(self, args: Sequence[Any], kwargs: dict[str, Any]) -> TokenLayout:
        raise NotImplementedError

    def block_layout(self, block: BlockInfo, layout: TokenLayout) -> TokenLayout:
        """The token layout inside ``block`` for a model input of ``layout`` (hierarchical models
        record their level's downsampling factor in ``block.extra["downsample"]``)."""
        return layout.downsampled(int(block.extra.get("downsample", 1)))

    def call_argument(self, name: str | None, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        """The value of the model's forward argument ``name`` in this call (``None`` if absent)."""
        if name is None:
            return None
        if name in kwargs:
            return kwargs[name]
        params = [p for p in self._signature.parameters if p != "self"]
        if name in params:
            position = params.index(name)
            if position < len(args):
                return args[position]
        return None

    def timestep(self, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        return self.call_argument(self.timestep_arg, args, kwargs)

    def sample(self, args: Sequence[Any], kwargs: dict[str, Any]) -> torch.Tensor:
        return self.call_argument(self.sample_arg, args, kwargs)

    def batch_size(self, args: Sequence[Any], kwargs: dict[str, Any]) -> int:
        sample = self.sample(args, kwargs)
        return int(sample.shape[0]) if isinstance(sample, torch.Tensor) else 0

    def context_tokens(self, args: Sequence[Any], kwargs: dict[str, Any]) -> int:
        context = self.call_argument(self.context_arg, args, kwargs)
        return int(context.shape[1]) if isinstance(context, torch.Tensor) and context.dim() >= 3 else 0

    def pinned_blocks(self) -> dict[int, str]:
        """Blocks (by position in :meth:`blocks`) that removing would break, with the reason: a
        structural fact of the family that block removal (hierarchical-prune) must respect."""
        return {}

    def describe(self) -> str:
        blocks = self.blocks()
        groups = sorted({b.group for b in blocks})
        return f"{self.family} ({type(self.model).__name__}): {len(blocks)} blocks in {', '.join(groups)}"


def grid_from_positions(positions: torch.Tensor) -> tuple[int, ...]:
    """The number of distinct values in each column of ``positions`` (S, k): the grid that position
    ids such as Flux's ``img_ids`` (S, 3) describe. Reads the tensor, so call it outside compiled code."""
    positions = positions.detach().reshape(-1, positions.shape[-1])
    return tuple(int(torch.unique(positions[:, column]).numel()) for column in range(positions.shape[-1]))


def blocks_from_lists(
    model: torch.nn.Module, groups: Sequence[tuple[str, BlockIO]], branch_names: dict[str, dict[str, str]]
) -> list[BlockInfo]:
    """Blocks of ``model`` from ``ModuleList`` attributes in execution order.

    ``groups``: ``(attribute name, io)`` pairs; ``branch_names[group]`` maps a branch kind (``self_attn``,
    ``cross_attn``, ``ffn``, ``context_ffn``) to the sub-module attribute name in that group's blocks.
    """
    blocks = []
    for group, io in groups:
        module_list = getattr(model, group, None)
        if module_list is None:
            continue
        names = branch_names.get(group, {})
        for i, block in enumerate(module_list):
            branches = {kind: getattr(block, attr, None) for kind, attr in names.items()}
            blocks.append(
                BlockInfo(name=f"{group}.{i}", module=block, group=group, index=len(blocks), io=io, **branches)
            )
    return blocks
