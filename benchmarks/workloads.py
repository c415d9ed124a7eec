"""What a benchmark runs per model kind: generate (diffusion) or classify (ViT), and how it is scored."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Workload:
    """A model plus the inputs a run covers. ``outputs`` are compared to the baseline's outputs."""

    name: str
    target: Any
    kind: str  # "image" | "video" | "classifier"
    steps: int
    samples: list[tuple[int, int]]  # (label, seed) pairs, or (label, index) for classifiers
    batch: int
    guidance_scale: float = 4.0
    extra: dict[str, Any] | None = None

    @property
    def model(self) -> torch.nn.Module:
        for attr in ("transformer", "unet"):
            if isinstance(getattr(self.target, attr, None), torch.nn.Module):
                return getattr(self.target, attr)
        return self.target

    @property
    def is_denoiser(self) -> bool:
        return self.kind != "classifier"

    def batches(self) -> list[list[tuple[int, int]]]:
        return [self.samples[i : i + self.batch] for i in range(0, len(self.samples), self.batch)]

    def run_batch(self, batch: list[tuple[int, int]]) -> torch.Tensor:
        """One pipeline call (or classifier forward) over ``batch``; outputs in [0, 1] or logits."""
        if self.kind == "classifier":
            images = self.extra["images"][[index for _, index in batch]]
            with torch.no_grad():
                return self.target(images).float()
        from accel.pipelines import generate

        labels = [label for label, _ in batch]
        seeds = [seed for _, seed in batch]
        return generate(self.target, labels, seeds, self.steps, self.guidance_scale, **(self.extra or {}))

    def run_all(self) -> torch.Tensor:
        return torch.cat([self.run_batch(batch) for batch in self.batches()])

    def quality(self, outputs: torch.Tensor, reference: torch.Tensor) -> dict[str, float | None]:
        """PSNR/SSIM against the baseline outputs plus the task metric."""
        from accel import metrics

        labels = torch.tensor([label for label, _ in self.samples])
        if self.kind == "classifier":
            agree = float((outputs.argmax(1) == reference.argmax(1)).float().mean())
            top1 = float((outputs.argmax(1) == labels).float().mean())
            return {"psnr": None, "ssim": None, "top1": top1, "agreement": agree}
        return {
            "psnr": float(metrics.psnr(reference, outputs)),
            "ssim": float(metrics.ssim(reference, outputs)),
            "judge_acc": float(metrics.judge_accuracy(outputs, labels)),
        }


def build_workload(
    model_name: str, steps: int, labels: list[int], seeds: list[int], batch: int, guidance_scale: float
) -> Workload:
    """Load ``model_name`` (embedded name, local folder, hub id or timm name) and pick its workload."""
    from accel.pipelines import load

    target = load(model_name)
    if isinstance(target, torch.nn.Module) and not hasattr(target, "transformer"):
        from accel.pipelines import classification_set

        images, targets = classification_set(model_name)
        samples = [(int(targets[i]), i) for i in range(len(targets))]
        return Workload(model_name, target.eval(), "classifier", 0, samples, batch,
                        extra={"images": images})
    kind = "video" if hasattr(target, "check_size") or "video" in type(target).__name__.lower() else "image"
    samples = [(label, seed) for seed in seeds for label in labels]
    return Workload(model_name, target, kind, steps, samples, batch, guidance_scale, extra=_size_kwargs(model_name))


def _size_kwargs(model_name: str) -> dict[str, Any]:
    """The embedded generators' reported sizes (e.g. video frames/height/width); others use their defaults."""
    from accel.pipelines import EMBEDDED, default_generation_kwargs

    if model_name not in EMBEDDED:
        return {}
    try:
        kwargs = default_generation_kwargs(model_name)
    except ValueError:
        return {}
    return {k: v for k, v in kwargs.items() if k not in ("steps", "guidance_scale")}
