"""Shape-true workloads: the published denoisers' widths, heads and token counts, random-init, so speed can be
measured at real sizes without any checkpoint.

    accel-bench --model shape:pixart-xl-512:blocks=4 --methods none,delta-dit,bac --steps 20
    accel-bench --model shape:wan-1.3b:blocks=2:frames=6 --methods none,adaspa,vmoba --steps 10

``blocks=N`` keeps N blocks of each stack (full width, heads and token count: only depth shrinks);
``latent=S`` and ``frames=F`` shrink the latent (spatial side S, F latent frames) for quick runs. The
benchmark times the denoiser over a fixed schedule (the family's own scheduler, its CFG layout) and
reports speedup, compute fraction, peak memory and parameter bytes. Quality is **not** measured: the
weights are random, so a PSNR against the baseline would say nothing about a trained model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Shape:
    """One published denoiser: its diffusers class and config, the latent it runs on and how it is called."""

    name: str
    model_class: str
    config: dict[str, Any]
    depth_keys: tuple[str, ...]  # config keys holding block counts (``blocks=N`` sets each)
    latent: tuple[int, ...]  # (C, H, W) or (C, F, H, W) of one sample
    text_tokens: int
    scheduler: str
    cfg: str  # "batched" (uncond and cond in one forward), "separate" (two forwards) or "none"
    source: str  # where the numbers come from
    inputs: Callable[[Shape, torch.nn.Module, torch.Tensor, torch.Generator], dict[str, Any]] = field(repr=False)

    @property
    def is_video(self) -> bool:
        return len(self.latent) == 4

    def tokens(self, latent: tuple[int, ...] | None = None) -> int:
        """Image (or video) tokens per sample after patchifying."""
        shape = latent or self.latent
        patch = self.config.get("patch_size", 1)
        patch_t, patch_hw = (patch[0], patch[1]) if isinstance(patch, (tuple, list)) else (
            self.config.get("patch_size_t", 1), patch)
        if self.model_class == "FluxTransformer2DModel":  # the pipeline packs 2x2 latent patches
            patch_hw = 2
        spatial = (shape[-2] // patch_hw) * (shape[-1] // patch_hw)
        return spatial * (math.ceil(shape[1] / patch_t) if self.is_video else 1)


def _text(shape: Shape, batch: int, gen: torch.Generator, width: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(batch, shape.text_tokens, width, generator=gen).to(dtype)


def _pixart_inputs(shape: Shape, model: torch.nn.Module, x: torch.Tensor, gen: torch.Generator) -> dict[str, Any]:
    text = _text(shape, x.shape[0], gen, shape.config["caption_channels"], x.dtype)
    return {"encoder_hidden_states": text, "encoder_attention_mask": torch.ones(x.shape[0], shape.text_tokens),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}


def _sd3_inputs(shape: Shape, model: torch.nn.Module, x: torch.Tensor, gen: torch.Generator) -> dict[str, Any]:
    return {"encoder_hidden_states": _text(shape, x.shape[0], gen, shape.config["joint_attention_dim"], x.dtype),
            "pooled_projections": torch.randn(x.shape[0], shape.config["pooled_projection_dim"],
                                              generator=gen).to(x.dtype)}


def _wan_inputs(shape: Shape, model: torch.nn.Module, x: torch.Tensor, gen: torch.Generator) -> dict[str, Any]:
    return {"encoder_hidden_states": _text(shape, x.shape[0], gen, shape.config["text_dim"], x.dtype)}


def _hunyuan_inputs(shape: Shape, model: torch.nn.Module, x: torch.Tensor, gen: torch.Generator) -> dict[str, Any]:
    b = x.shape[0]
    return {"encoder_hidden_states": _text(shape, b, gen, shape.config["text_embed_dim"], x.dtype),
            "encoder_attention_mask": torch.ones(b, shape.text_tokens),
            "pooled_projections": torch.randn(b, shape.config["pooled_projection_dim"], generator=gen).to(x.dtype),
            "guidance": torch.full((b,), 6000.0, dtype=x.dtype)}


def _flux_inputs(shape: Shape, model: torch.nn.Module, x: torch.Tensor, gen: torch.Generator) -> dict[str, Any]:
    b = x.shape[0]
    return {"encoder_hidden_states": _text(shape, b, gen, shape.config["joint_attention_dim"], x.dtype),
            "pooled_projections": torch.randn(b, shape.config["pooled_projection_dim"], generator=gen).to(x.dtype),
            "txt_ids": torch.zeros(shape.text_tokens, 3), "img_ids": _flux_image_ids(x),
            "guidance": torch.full((b,), 3.5, dtype=x.dtype)}


def _flux_image_ids(packed: torch.Tensor) -> torch.Tensor:
    side = math.isqrt(packed.shape[1])
    ids = torch.zeros(side, side, 3)
    ids[..., 1] = torch.arange(side)[:, None]
    ids[..., 2] = torch.arange(side)[None, :]
    return ids.reshape(-1, 3)


SHAPES: dict[str, Shape] = {s.name: s for s in (
    Shape("pixart-xl-512", "PixArtTransformer2DModel", {
        "num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": 8, "num_layers": 28,
        "cross_attention_dim": 1152, "attention_bias": True, "sample_size": 64, "patch_size": 2,
        "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000, "norm_type": "ada_norm_single",
        "norm_elementwise_affine": False, "norm_eps": 1e-6, "caption_channels": 4096,
        "use_additional_conditions": False}, ("num_layers",), (4, 64, 64), 120, "DPMSolverMultistepScheduler",
        "batched", "PixArt-alpha/PixArt-XL-2-512x512: 28 blocks x 1152, 512 px = 1,024 tokens, T5 120 tokens",
        _pixart_inputs),
    Shape("sd3-medium", "SD3Transformer2DModel", {
        "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24, "attention_head_dim": 64,
        "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
        "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 192}, ("num_layers",),
        (16, 128, 128), 333, "FlowMatchEulerDiscreteScheduler", "batched",
        "stabilityai/stable-diffusion-3-medium: 24 joint blocks x 1536, 1024 px = 4,096 + 333 text tokens",
        _sd3_inputs),
    Shape("flux-dev", "FluxTransformer2DModel", {
        "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
        "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
        "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)}, ("num_layers", "num_single_layers"),
        (16, 128, 128), 512, "FlowMatchEulerDiscreteScheduler", "none",
        "black-forest-labs/FLUX.1-dev: 19 double + 38 single blocks x 3072, 1024 px = 4,096 + 512 text tokens, "
        "guidance-distilled (no CFG)", _flux_inputs),
    Shape("wan-1.3b", "WanTransformer3DModel", {
        "patch_size": (1, 2, 2), "num_attention_heads": 12, "attention_head_dim": 128, "in_channels": 16,
        "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 8960, "num_layers": 30,
        "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024},
        ("num_layers",), (16, 21, 60, 104), 512, "FlowMatchEulerDiscreteScheduler", "separate",
        "Wan-AI/Wan2.1-T2V-1.3B-Diffusers: 30 blocks x 1536, 832x480x81 frames = 32,760 tokens, UMT5 512 tokens",
        _wan_inputs),
    Shape("hunyuan-video", "HunyuanVideoTransformer3DModel", {
        "in_channels": 16, "out_channels": 16, "num_attention_heads": 24, "attention_head_dim": 128,
        "num_layers": 20, "num_single_layers": 40, "num_refiner_layers": 2, "mlp_ratio": 4.0, "patch_size": 2,
        "patch_size_t": 1, "qk_norm": "rms_norm", "guidance_embeds": True, "text_embed_dim": 4096,
        "pooled_projection_dim": 768, "rope_theta": 256.0, "rope_axes_dim": (16, 56, 56)},
        ("num_layers", "num_single_layers"), (16, 33, 90, 160), 256, "FlowMatchEulerDiscreteScheduler", "none",
        "hunyuanvideo-community/HunyuanVideo: 20 double + 40 single blocks x 3072, 1280x720x129 frames = "
        "118,800 tokens, guidance-distilled (no CFG)", _hunyuan_inputs),
)}

OVERRIDES = ("blocks", "latent", "frames")


@dataclass(frozen=True)
class ShapeSpec:
    """A parsed ``shape:NAME[:blocks=N][:latent=S][:frames=F]``."""

    shape: Shape
    blocks: int | None = None
    latent_side: int | None = None
    frames: int | None = None

    @property
    def latent(self) -> tuple[int, ...]:
        dims = list(self.shape.latent)
        if self.latent_side:
            dims[-2] = dims[-1] = self.latent_side
        if self.frames and self.shape.is_video:
            dims[1] = self.frames
        return tuple(dims)

    def config(self) -> dict[str, Any]:
        config = dict(self.shape.config)
        if self.blocks is not None:
            for key in self.shape.depth_keys:
                config[key] = min(self.blocks, config[key])
            if "num_refiner_layers" in config:
                config["num_refiner_layers"] = min(self.blocks, config["num_refiner_layers"])
        if self.latent_side and "sample_size" in config:
            config["sample_size"] = self.latent_side
        return config

    def describe(self) -> str:
        depth = "/".join(str(self.config()[k]) for k in self.shape.depth_keys)
        return (f"{self.shape.name}: {self.shape.model_class}, {depth} blocks at full width, "
                f"{self.shape.tokens(self.latent):,} tokens per sample (published: {self.shape.source})")


def is_shape(name: str) -> bool:
    return name.startswith("shape:")


def parse_shape(text: str) -> ShapeSpec:
    """``shape:pixart-xl-512:blocks=4`` → :class:`ShapeSpec`; unknown names or settings are refused."""
    parts = text.split(":")
    if len(parts) < 2 or parts[0] != "shape" or parts[1] not in SHAPES:
        raise ValueError(f"Unknown shape workload {text!r}; accepted: "
                         f"{', '.join('shape:' + n for n in SHAPES)}, each with optional "
                         ":blocks=N (blocks kept per stack), :latent=S (latent side), :frames=F (latent frames).")
    values: dict[str, int] = {}
    for item in parts[2:]:
        key, sep, value = item.partition("=")
        if key not in OVERRIDES or not sep or not value.isdigit() or int(value) < 1:
            raise ValueError(f"Bad setting {item!r} in {text!r}; accepted: blocks=N, latent=S, frames=F "
                             "(whole numbers >= 1).")
        values[key] = int(value)
    shape = SHAPES[parts[1]]
    if "frames" in values and not shape.is_video:
        raise ValueError(f"{shape.name} is an image model: frames= does not apply.")
    return ShapeSpec(shape, values.get("blocks"), values.get("latent"), values.get("frames"))


def _on_device(value: Any, device: str) -> Any:
    """Call inputs (tensors, possibly inside dicts) moved to ``device``; the inputs are drawn on the CPU
    so every device sees the same numbers."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: _on_device(item, device) for key, item in value.items()}
    return value


class ShapePipeline:
    """The published denoiser, random-init, driven over a fixed schedule with the family's scheduler and
    CFG layout: what ``accel.patch`` sees in a real pipeline's loop, without text encoder or VAE."""

    def __init__(self, spec: ShapeSpec, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 seed: int = 0) -> None:
        import diffusers

        self.spec = spec
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = getattr(diffusers, spec.shape.model_class)(**spec.config())
        if dtype != torch.float32:
            model = model.to(dtype)
        self.transformer = model.to(device).eval().requires_grad_(False)
        self.scheduler = getattr(diffusers, spec.shape.scheduler)()
        self.dtype, self.device = dtype, device

    def _latents(self, seeds: list[int]) -> torch.Tensor:
        noise = [torch.randn(self.spec.latent, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        x = torch.stack(noise)
        if self.spec.shape.model_class == "FluxTransformer2DModel":  # pack 2x2 patches, as FluxPipeline does
            b, c, h, w = x.shape
            x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
        return x.to(device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def __call__(self, num_inference_steps: int, seeds: list[int], output_type: str = "pt") -> torch.Tensor:
        """The final latents (float32, CPU) after ``num_inference_steps`` steps, one sample per seed
        (``output_type`` is accepted for the calibration steps' calls and ignored: there is no VAE)."""
        x = self._latents(seeds)
        cfg = self.spec.shape.cfg
        batch_in = torch.cat([x, x]) if cfg == "batched" else x
        inputs = _on_device(self.spec.shape.inputs(self.spec.shape, self.transformer, batch_in,
                                                   torch.Generator().manual_seed(7)), self.device)
        flux_time = self.spec.shape.model_class in ("FluxTransformer2DModel",)
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.scheduler.timesteps:
            model_in = torch.cat([x, x]) if cfg == "batched" else x
            step_t = (t / 1000 if flux_time else t).expand(model_in.shape[0]).to(self.device)
            out = self.transformer(model_in, timestep=step_t, return_dict=False, **inputs)[0]
            if cfg == "batched":
                uncond, cond = out.chunk(2)
                out = uncond + 4.5 * (cond - uncond)
            elif cfg == "separate":
                uncond = self.transformer(x, timestep=step_t, return_dict=False, **inputs)[0]
                out = uncond + 5.0 * (out - uncond)
            out = out[:, : x.shape[1]] if out.shape[1] != x.shape[1] and out.dim() == x.dim() else out
            x = self.scheduler.step(out, t, x, return_dict=False)[0]
        return x.float().cpu()

