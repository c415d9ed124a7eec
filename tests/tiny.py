"""A tiny class-conditional DiT and a minimal pipeline around it, for fast structural tests."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel


def tiny_dit(layers: int = 3, seed: int = 0) -> DiTTransformer2DModel:
    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1, num_layers=layers,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10,
    ).eval()


def loop(model: torch.nn.Module, steps: int = 4, batch: int = 2, size: int = 8) -> torch.Tensor:
    """A hand-written denoising loop on the bare model (decreasing timesteps, no scheduler)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1, size, size, generator=gen)
    labels = torch.arange(batch) % 10
    with torch.no_grad():
        for t in torch.linspace(900, 100, steps).round():
            out = model(x, timestep=t.expand(batch), class_labels=labels).sample
            x = x - 0.1 * out
    return x


class TinyPipe:
    """Calls ``scheduler.set_timesteps`` then the transformer once per step, like diffusers' DiTPipeline."""

    def __init__(self, layers: int = 3) -> None:
        self.transformer = tiny_dit(layers)
        self.scheduler = DDIMScheduler(num_train_timesteps=1000)

    def __call__(self, class_labels, num_inference_steps: int = 10, generator=None, output_type: str = "pt"):
        self.scheduler.set_timesteps(num_inference_steps)
        generator = generator or torch.Generator().manual_seed(0)
        if isinstance(generator, list):  # one per sample, as diffusers pipelines take them
            x = torch.cat([torch.randn(1, 1, 8, 8, generator=g) for g in generator])
        else:
            x = torch.randn(len(class_labels), 1, 8, 8, generator=generator)
        labels = torch.tensor(class_labels)
        with torch.no_grad():
            for t in self.scheduler.timesteps:
                eps = self.transformer(x, timestep=t.expand(len(labels)), class_labels=labels).sample
                x = self.scheduler.step(eps, t, x).prev_sample
        return x
