"""``DigitsVideoPipeline``: a small diffusers ``WanTransformer3DModel`` generating moving digits in pixels.

The denoiser is diffusers' Wan transformer (3D RoPE, self-attention over frames x height x width
patches, cross-attention to a conditioning sequence), so accel's Wan adapter and sparse attention see
the real architecture. The "prompt" is a digit: ``DigitLabelEmbedder`` maps a label (or the null label
10, used for classifier-free guidance) to a short learned sequence fed as ``encoder_hidden_states``.
Sampling is flow matching with ``FlowMatchEulerDiscreteScheduler``, as Wan does.

    pipe = DigitsVideoPipeline.from_pretrained(folder)
    frames = pipe(class_labels=[3], num_frames=16, num_inference_steps=50, guidance_scale=4.0,
                  generator=torch.Generator().manual_seed(0), output_type="np").frames  # (1, 16, 32, 32)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from accel.pipelines.digits_dit import check_labels
from diffusers import DiffusionPipeline, ModelMixin, SchedulerMixin, WanTransformer3DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

VIDEO_OUTPUT_TYPES = ("np", "pt")


@dataclass
class DigitsVideoOutput(BaseOutput):
    """``frames``: (B, F, H, W) in [0, 1], numpy or torch."""

    frames: np.ndarray | torch.Tensor


class DigitLabelEmbedder(ModelMixin, ConfigMixin):
    """Learned "text encoder" for digits: label -> (num_tokens, text_dim); row ``num_classes`` is null."""

    @register_to_config
    def __init__(self, num_classes: int = 10, num_tokens: int = 4, text_dim: int = 32) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(num_classes + 1, num_tokens, text_dim) * 0.5)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """(B,) long labels in [0, num_classes] -> (B, num_tokens, text_dim)."""
        return self.table[labels]


class DigitsVideoPipeline(DiffusionPipeline):
    """Class-conditional pixel-space video generation with a Wan transformer.

    Components: ``transformer`` (``WanTransformer3DModel``, velocity prediction), ``label_embedder``
    (``DigitLabelEmbedder``) and ``scheduler`` (``FlowMatchEulerDiscreteScheduler``). As in diffusers'
    ``WanPipeline``, the conditional and unconditional branches are separate transformer forwards, the
    conditional one first; ``scheduler.set_timesteps`` runs once per call.
    """

    model_cpu_offload_seq = "label_embedder->transformer"

    def __init__(self, transformer: WanTransformer3DModel, label_embedder: DigitLabelEmbedder,
                 scheduler: SchedulerMixin) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, label_embedder=label_embedder, scheduler=scheduler)

    @property
    def num_classes(self) -> int:
        return int(self.label_embedder.config.num_classes)

    def check_size(self, num_frames: int, height: int, width: int) -> None:
        _, p_h, p_w = self.transformer.config.patch_size
        if num_frames < 1 or height % p_h or width % p_w or height < p_h or width < p_w:
            raise ValueError(f"num_frames must be >= 1 and height/width multiples of the patch ({p_h}, {p_w}); "
                             f"got num_frames={num_frames}, height={height}, width={width}.")

    def num_tokens(self, num_frames: int, height: int, width: int) -> int:
        """Video tokens per sample that self-attention sees: frames x (height/p) x (width/p)."""
        p_t, p_h, p_w = self.transformer.config.patch_size
        return (num_frames // p_t) * (height // p_h) * (width // p_w)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | Sequence[int] | torch.Tensor,
        num_inference_steps: int = 50,
        guidance_scale: float = 4.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_frames: int = 16,
        height: int = 32,
        width: int = 32,
        output_type: str = "np",
        return_dict: bool = True,
    ) -> DigitsVideoOutput | tuple:
        """Generates one video per class label.

        Args:
            class_labels: digits 0-9.
            num_inference_steps: Euler flow-matching steps.
            guidance_scale: classifier-free guidance weight; <= 1 runs the conditional branch only.
            generator: seeds the initial noise (a fixed generator gives identical videos).
            num_frames, height, width: video size in frames and pixels (height, width multiples of the patch).
            output_type: ``"np"`` or ``"pt"``; frames are (B, F, H, W) in [0, 1].
            return_dict: return ``DigitsVideoOutput`` rather than a tuple.
        """
        if output_type not in VIDEO_OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {VIDEO_OUTPUT_TYPES}, got {output_type!r}.")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
        self.check_size(num_frames, height, width)
        device = self._execution_device
        dtype = self.transformer.dtype
        labels = check_labels(class_labels, self.num_classes).to(device)
        cond = self.label_embedder(labels).to(dtype)
        uncond = self.label_embedder(torch.full_like(labels, self.num_classes)).to(dtype)
        channels = self.transformer.config.in_channels
        latents = randn_tensor((labels.shape[0], channels, num_frames, height, width), generator=generator,
                               device=device, dtype=dtype)  # (B, C, F, H, W) as Wan expects

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            timestep = t.expand(latents.shape[0])
            # return_dict=False: diffusers' context-parallel hooks take tensors only (as WanPipeline calls it)
            velocity = self.transformer(latents, timestep=timestep, encoder_hidden_states=cond,
                                        return_dict=False)[0]
            if guidance_scale > 1:
                v_uncond = self.transformer(latents, timestep=timestep, encoder_hidden_states=uncond,
                                            return_dict=False)[0]
                velocity = v_uncond + guidance_scale * (velocity - v_uncond)
            latents = self.scheduler.step(velocity, t, latents).prev_sample

        frames = (latents[:, 0].float() / 2 + 0.5).clamp(0, 1)  # (B, F, H, W); trained on [-1, 1]
        self.maybe_free_model_hooks()
        if output_type == "np":
            frames = frames.cpu().numpy()
        if not return_dict:
            return (frames,)
        return DigitsVideoOutput(frames=frames)
