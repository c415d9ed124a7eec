"""What a benchmark runs per model kind: generate (diffusion) or classify (ViT), and how it is scored."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Workload:
    """A model plus the inputs a run covers. ``outputs`` are compared to the baseline's outputs.

    ``samples`` are (condition, seed) pairs for generators (a prompt or class label each) and (label, index)
    pairs for classifiers. ``extra`` holds the rest of each call (negative prompt, height/width, frames).
    ``task``: the embedded generators' task metric (``accel.pipelines.tasks``), None for other models.
    """

    name: str
    target: Any
    kind: str  # "image" | "video" | "classifier" | "shape" (a random-init published denoiser, timed only)
    steps: int
    samples: list[tuple[Any, int]]
    batch: int
    guidance_scale: float | None = None
    extra: dict[str, Any] | None = None
    task: str | None = None
    lpips_weights: str | None = None  # AlexNet checkpoint for LPIPS (else torch's hub cache, else skipped)
    clip_model: str | None = None  # local CLIP folder for the CLIP score of prompt pipelines

    @property
    def model(self) -> torch.nn.Module:
        for attr in ("transformer", "unet"):
            if isinstance(getattr(self.target, attr, None), torch.nn.Module):
                return getattr(self.target, attr)
        return self.target

    @property
    def is_denoiser(self) -> bool:
        return self.kind != "classifier"

    def batches(self) -> list[list[tuple[Any, int]]]:
        return [self.samples[i : i + self.batch] for i in range(0, len(self.samples), self.batch)]

    def call_kwargs(self, batch: list[tuple[Any, int]]) -> dict[str, Any]:
        """The pipeline call for ``batch`` (what :meth:`run_batch` runs), built by the generation driver."""
        if self.kind == "shape":
            return {"num_inference_steps": self.steps, "seeds": [s for _, s in batch]}
        from accel.pipelines.generation import build_call

        return build_call(self.target, [c for c, _ in batch], [s for _, s in batch], self.steps,
                          self.guidance_scale, **(self.extra or {}))

    def calibration_calls(self, count: int = 1, seed_offset: int = 10_000) -> list[dict[str, Any]]:
        """Calls like the evaluation's first batch (same conditions, size and steps) on seeds the
        evaluation does not use: what offline calibration (BAC, QuEST, prune, MagCache) runs."""
        first = self.batches()[0]
        return [self.call_kwargs([(c, seed_offset + 1000 * k + i) for i, (c, _) in enumerate(first)])
                for k in range(count)]

    def run_batch(self, batch: list[tuple[Any, int]]) -> torch.Tensor:
        """One pipeline call (or classifier forward) over ``batch``; outputs in [0, 1] or logits."""
        if self.kind == "classifier":
            images = self.extra["images"][[index for _, index in batch]]
            with torch.no_grad():
                return self.target(images).float()
        if self.kind == "shape":
            return self.target(**self.call_kwargs(batch))
        from accel.pipelines.generation import run_call

        return run_call(self.target, self.call_kwargs(batch))

    def run_all(self) -> torch.Tensor:
        return torch.cat([self.run_batch(batch) for batch in self.batches()])

    def quality(self, outputs: torch.Tensor, reference: torch.Tensor) -> dict[str, float | None]:
        """PSNR/SSIM against the baseline outputs plus the task metric where one exists."""
        from accel import metrics

        if self.kind == "shape":
            return {"quality": "quality: not measured on shape workloads (random weights)"}
        if self.kind == "classifier":
            labels = torch.tensor([label for label, _ in self.samples])
            agree = float((outputs.argmax(1) == reference.argmax(1)).float().mean())
            top1 = float((outputs.argmax(1) == labels).float().mean())
            return {"psnr": None, "ssim": None, "top1": top1, "agreement": agree}
        scores: dict[str, float | None] = {
            "psnr": float(metrics.psnr(reference, outputs)),
            "ssim": float(metrics.ssim(reference, outputs)),
        }
        scores["lpips"] = metrics.lpips(reference, outputs, weights=self.lpips_weights)
        conditions = [c for c, _ in self.samples]
        if conditions and isinstance(conditions[0], str):
            frames = outputs.shape[1] if outputs.dim() == 5 else 1  # a video's frames share its prompt
            prompts = [c for c in conditions for _ in range(frames)]
            scores["clip_score"] = metrics.clip_score(outputs, prompts, self.clip_model)
        if self.task:
            from accel.pipelines.tasks import task_scores

            scores.update(task_scores(self.task, outputs, conditions))
        return scores


def build_workload(
    model_name: str,
    steps: int,
    labels: list[int],
    seeds: list[int],
    batch: int,
    guidance_scale: float | None,
    *,
    prompts: list[str] | None = None,
    sizes: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    device: str | None = None,
) -> Workload:
    """Load ``model_name`` (embedded name, local folder, hub id or timm name) and pick its workload.

    Text-conditioned pipelines run ``prompts`` (the built-in set when ``None``), class-conditional ones
    ``labels``; ``sizes`` (negative_prompt, height, width, num_frames) override the embedded defaults.
    """
    from accel.benchmarks.shapes import ShapePipeline, is_shape, parse_shape
    from accel.pipelines import load
    from accel.pipelines.generation import DEFAULT_PROMPTS, call_signature, folder_prompts
    from accel.pipelines.tasks import task_kind

    if is_shape(model_name):
        pipe = ShapePipeline(parse_shape(model_name), dtype or torch.float32, device or "cpu")
        return Workload(model_name, pipe, "shape", steps, [(None, seed) for seed in seeds], batch)
    target = load(model_name, device=device or "cpu", dtype=dtype)
    if isinstance(target, torch.nn.Module) and not hasattr(target, "transformer"):
        from accel.pipelines import classification_set

        images, targets = classification_set(model_name)
        samples = [(int(targets[i]), i) for i in range(len(targets))]
        return Workload(model_name, target.eval(), "classifier", 0, samples, batch,
                        extra={"images": images.to(device=device or "cpu", dtype=dtype or torch.float32)})
    sig = call_signature(target)
    if sig.is_text:
        conditions: list[Any] = list(prompts or folder_prompts(target) or DEFAULT_PROMPTS)
    elif prompts:
        raise ValueError(f"{model_name!r} ({sig.pipeline}) is class-conditional: it takes --labels, "
                         "not --prompts.")
    else:
        conditions = list(labels)
    kind = "video" if sig.is_video else "image"
    samples = [(condition, seed) for seed in seeds for condition in conditions]
    extra = {**_size_kwargs(model_name), **{k: v for k, v in (sizes or {}).items() if v is not None}}
    return Workload(model_name, target, kind, steps, samples, batch, guidance_scale, extra=extra or None,
                    task=task_kind(target))


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
