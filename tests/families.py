"""Tiny random-init models of every supported family, their forward inputs and a short denoising loop.

Each :class:`Family` builds its model from an init dict (seeded, 2 blocks per list, small dims, as
diffusers' own tests do) and makes inputs for a (batch, spatial size, frames, timestep). ``size`` is the
side of the model's input (latent pixels, or the packed token grid for Flux, or image pixels for timm).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

Inputs = Callable[[int, int, int, torch.Generator], dict[str, Any]]


@dataclass(frozen=True)
class Family:
    """One model family: how to build a tiny model and call it."""

    name: str
    cls: str  # "module:Class"
    init: dict[str, Any]
    sample: Callable[[int, int, int, torch.Generator], torch.Tensor]  # (batch, size, frames, gen) -> x
    conditioning: Inputs  # constant kwargs of one loop (text, ids, labels...)
    adapter: str
    sizes: tuple[int, int]
    frames: tuple[int, int] = (1, 1)
    frame_patch: int = 1  # latent frames per token
    sample_arg: str = "hidden_states"
    timestep_scale: float = 1.0  # Flux takes t / 1000
    is_denoiser: bool = True

    @property
    def is_video(self) -> bool:
        return self.frames[0] != self.frames[1]

    def build(self, seed: int = 0) -> torch.nn.Module:
        module, name = self.cls.split(":")
        torch.manual_seed(seed)
        return getattr(importlib.import_module(module), name)(**self.init).eval()


def _randn(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def _text(dim: int, tokens: int = 5, **extra: Callable[[int, torch.Generator], Any]) -> Inputs:
    def make(batch: int, size: int, frames: int, gen: torch.Generator) -> dict[str, Any]:
        kwargs = {"encoder_hidden_states": _randn(batch, tokens, dim, gen=gen)}
        kwargs.update({key: fn(batch, gen) for key, fn in extra.items()})
        return kwargs

    return make


def _image(channels: int = 4) -> Callable[[int, int, int, torch.Generator], torch.Tensor]:
    return lambda b, s, f, gen: _randn(b, channels, s, s, gen=gen)


def _video(channels_first: bool = True) -> Callable[[int, int, int, torch.Generator], torch.Tensor]:
    if channels_first:
        return lambda b, s, f, gen: _randn(b, 4, f, s, s, gen=gen)  # (B, C, F, H, W)
    return lambda b, s, f, gen: _randn(b, f, 4, s, s, gen=gen)  # (B, F, C, H, W)


def _flux_conditioning(batch: int, size: int, frames: int, gen: torch.Generator) -> dict[str, Any]:
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()  # (S, 3)
    return {"encoder_hidden_states": _randn(batch, 5, 16, gen=gen),
            "pooled_projections": _randn(batch, 16, gen=gen), "img_ids": img_ids,
            "txt_ids": torch.zeros(5, 3)}


def _ltx_conditioning(batch: int, size: int, frames: int, gen: torch.Generator) -> dict[str, Any]:
    return {"encoder_hidden_states": _randn(batch, 5, 16, gen=gen),
            "encoder_attention_mask": torch.ones(batch, 5),
            "num_frames": frames, "height": size, "width": size}


_D = "diffusers"
FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("dit", f"{_D}:DiTTransformer2DModel", dict(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10),
        _image(), lambda b, s, f, gen: {"class_labels": torch.arange(b) % 10}, "DiTAdapter", (8, 12)),
    Family("pixart", f"{_D}:PixArtTransformer2DModel", dict(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2,
        caption_channels=16, in_channels=4, out_channels=4, cross_attention_dim=16, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6),
        _image(), _text(16, added_cond_kwargs=lambda b, gen: {"resolution": None, "aspect_ratio": None}),
        "DiTAdapter", (8, 12)),
    Family("sd3", f"{_D}:SD3Transformer2DModel", dict(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        caption_projection_dim=16, joint_attention_dim=16, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=16),
        _image(), _text(16, pooled_projections=lambda b, gen: _randn(b, 16, gen=gen)), "SD3Adapter", (8, 12)),
    Family("flux", f"{_D}:FluxTransformer2DModel", dict(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(4, 4, 8)),
        lambda b, s, f, gen: _randn(b, s * s, 4, gen=gen), _flux_conditioning, "FluxAdapter", (4, 6),
        timestep_scale=1e-3),
    Family("wan", f"{_D}:WanTransformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
        _video(), _text(16), "WanAdapter", (4, 6), frames=(2, 3)),
    Family("hunyuan_video", f"{_D}:HunyuanVideoTransformer3DModel", dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4)),
        _video(), _text(16, encoder_attention_mask=lambda b, gen: torch.ones(b, 5),
                        pooled_projections=lambda b, gen: _randn(b, 8, gen=gen),
                        guidance=lambda b, gen: torch.full((b,), 3500.0)),
        "HunyuanVideoAdapter", (4, 6), frames=(2, 3)),
    Family("cogvideox", f"{_D}:CogVideoXTransformer3DModel", dict(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=8, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=8),
        # The sinusoidal position table has exactly max_text_seq_length text slots.
        _video(channels_first=False), _text(8, tokens=8), "CogVideoXAdapter", (4, 6), frames=(2, 3)),
    Family("cogvideox15", f"{_D}:CogVideoXTransformer3DModel", dict(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=8, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        patch_size_t=2, temporal_compression_ratio=4, max_text_seq_length=8,
        use_rotary_positional_embeddings=True),
        _video(channels_first=False), _text(8, tokens=8), "CogVideoXAdapter", (4, 6), frames=(2, 4),
        frame_patch=2),
    Family("ltx", f"{_D}:LTXVideoTransformer3DModel", dict(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2,
        attention_head_dim=8, cross_attention_dim=16, num_layers=2, caption_channels=16,
        qk_norm="rms_norm_across_heads"),
        lambda b, s, f, gen: _randn(b, f * s * s, 4, gen=gen), _ltx_conditioning, "LTXVideoAdapter", (4, 6),
        frames=(2, 3)),
    Family("unet", f"{_D}:UNet2DConditionModel", dict(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
        norm_num_groups=4, attention_head_dim=2),
        _image(), _text(16), "UNetAdapter", (8, 12), sample_arg="sample"),
    Family("timm_vit", "timm.models.vision_transformer:VisionTransformer", dict(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10, dynamic_img_size=True),
        _image(3), lambda b, s, f, gen: {}, "TimmViTAdapter", (32, 48), sample_arg="x", is_denoiser=False),
    Family("timm_deit", "timm.models.deit:VisionTransformerDistilled", dict(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10, dynamic_img_size=True),
        _image(3), lambda b, s, f, gen: {}, "TimmViTAdapter", (32, 48), sample_arg="x", is_denoiser=False),
    Family("timm_swin", "timm.models.swin_transformer:SwinTransformer", dict(
        img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 2),
        num_classes=10, strict_img_size=False),
        _image(3), lambda b, s, f, gen: {}, "TimmSwinAdapter", (32, 48), sample_arg="x", is_denoiser=False),
]}


def forward_kwargs(family: Family, batch: int, size: int, frames: int = 1, timestep: float = 500.0,
                   seed: int = 0) -> dict[str, Any]:
    """All keyword arguments of one forward of ``family``'s model."""
    gen = torch.Generator().manual_seed(seed)
    kwargs = {family.sample_arg: family.sample(batch, size, frames, gen),
              **family.conditioning(batch, size, frames, gen)}
    if family.is_denoiser:
        kwargs["timestep"] = torch.full((batch,), timestep * family.timestep_scale)
        kwargs["return_dict"] = False
    return kwargs


def _call(model: torch.nn.Module, family: Family, x: torch.Tensor, t: float,
          cond: dict[str, Any]) -> torch.Tensor:
    timestep = torch.full((x.shape[0],), t * family.timestep_scale)
    return model(**{family.sample_arg: x}, timestep=timestep, return_dict=False, **cond)[0]


@torch.no_grad()
def run_loop(model: torch.nn.Module, family: Family, steps: int = 3, batch: int = 1, size: int | None = None,
             frames: int | None = None, seed: int = 0, cfg: str = "none") -> torch.Tensor:
    """A short deterministic denoising loop, ``x <- x - 0.1 * model(x, t)`` with decreasing timesteps.

    ``cfg="separate"`` runs the conditional and unconditional forwards one after the other with the same
    timestep (as Wan and Flux true-CFG do); ``"batched"`` runs both in one forward of twice the batch.
    timm models get one forward on images.
    """
    size = family.sizes[0] if size is None else size
    frames = family.frames[0] if frames is None else frames
    gen = torch.Generator().manual_seed(seed)
    x = family.sample(batch, size, frames, gen)
    cond = family.conditioning(batch, size, frames, gen)
    if not family.is_denoiser:
        return model(x)
    uncond = family.conditioning(batch, size, frames, gen)
    if cfg == "batched":
        both = family.conditioning(2 * batch, size, frames, torch.Generator().manual_seed(seed + 1))
    for t in torch.linspace(900, 100, steps).tolist():
        if cfg == "separate":
            c, u = _call(model, family, x, t, cond), _call(model, family, x, t, uncond)
            out = u + 2.0 * (c - u)
        elif cfg == "batched":
            u, c = _call(model, family, torch.cat([x, x]), t, both).chunk(2)
            out = u + 2.0 * (c - u)
        else:
            out = _call(model, family, x, t, cond)
        x = x - 0.1 * out
    return x
