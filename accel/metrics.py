"""Quality metrics against a baseline output of the same seed, for any model.

    from accel import metrics
    metrics.psnr(baseline, fast)             # dB; inf when identical
    metrics.ssim(baseline, fast)             # 1.0 when identical
    metrics.top1(classifier, images, labels)
    metrics.frechet_distance(features_a, features_b)

The embedded generators' task metrics (digit judges, caption attributes, FID-digits) are in
``accel.pipelines.judges``, beside the models they score.

Images are in [0, 1]: (N, C, H, W), (N, H, W) (one channel) or videos (N, F, H, W), which are scored
frame by frame (each frame one grayscale image). PSNR/SSIM come from torchmetrics; LPIPS/FID/CLIP are
optional and report ``skipped: weights not available offline`` instead of downloading anything.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from pathlib import Path
from typing import Any

import torch

SKIPPED_OFFLINE = "skipped: weights not available offline"


def as_images(x: torch.Tensor, video: bool | None = None) -> torch.Tensor:
    """Reshapes (N, C, H, W) | (N, H, W) | (N, F, H, W) | (N, F, C, H, W) into (M, C, H, W) float images.

    A 4-D tensor is read as images when its second dimension is 1 or 3 (channels) and as video otherwise;
    pass ``video=True`` for a video with 1 or 3 frames.
    """
    if not torch.is_tensor(x):
        x = torch.as_tensor(x)
    x = x.detach().float().cpu()
    if x.ndim == 3:
        return x.unsqueeze(1)
    if x.ndim == 4:
        if video or (video is None and x.shape[1] not in (1, 3)):
            return x.reshape(-1, 1, *x.shape[-2:])
        return x
    if x.ndim == 5:  # (N, F, C, H, W) videos, as accel.pipelines.generate returns them
        return x.reshape(-1, *x.shape[2:])
    raise ValueError(f"Expected images (N, C, H, W) or (N, H, W) or videos (N, F, H, W) / (N, F, C, H, W), "
                     f"got shape {tuple(x.shape)}.")


def _pair(baseline: torch.Tensor, other: torch.Tensor, video: bool | None) -> tuple[torch.Tensor, torch.Tensor]:
    if tuple(baseline.shape) != tuple(other.shape):
        raise ValueError(f"baseline and other must have the same shape, got {tuple(baseline.shape)} and "
                         f"{tuple(other.shape)}.")
    return as_images(baseline, video), as_images(other, video)


def psnr(baseline: torch.Tensor, other: torch.Tensor, video: bool | None = None) -> float:
    """Peak signal-to-noise ratio in dB over the whole batch (data range 1); ``inf`` when identical.

    torchmetrics returns a large finite number for identical inputs; the exact answer, inf, makes a
    bit-exact method recognisable in a report.
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio

    a, b = _pair(baseline, other, video)
    if torch.equal(a, b):
        return math.inf
    return float(peak_signal_noise_ratio(b, a, data_range=1.0))


def ssim(baseline: torch.Tensor, other: torch.Tensor, video: bool | None = None) -> float:
    """Mean structural similarity (data range 1); 1.0 when identical.

    The Gaussian window is shrunk for small images (the default 11 px does not fit a 16 px digit well).
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    a, b = _pair(baseline, other, video)
    if torch.equal(a, b):
        return 1.0
    side = min(a.shape[-2:])
    kernel = 11 if side >= 64 else 7 if side >= 16 else 3
    return float(structural_similarity_index_measure(b, a, data_range=1.0, kernel_size=kernel,
                                                     sigma=1.5 * kernel / 11))


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N,) argmax class of each image (the model gets images as given, in batches, on its device/dtype)."""
    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    preds = [model(images[i:i + batch_size].to(device, dtype)).argmax(-1).cpu()
             for i in range(0, len(images), batch_size)]
    return torch.cat(preds)


@torch.no_grad()
def top1(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Fraction of ``images`` whose argmax class equals ``labels`` (the model gets images as given)."""
    labels = torch.as_tensor(labels).reshape(-1).cpu()
    if len(images) != len(labels):
        raise ValueError(f"top1 needs one label per image, got {len(images)} images and {len(labels)} labels.")
    return float((predict(model, images, batch_size) == labels).float().mean())


# torchvision's AlexNet weights (LPIPS backbone), torch-fidelity's Inception (FID) and the CLIP model would be
# fetched on first use; accel only uses copies already on disk and never downloads.
_LPIPS_BACKBONE = "alexnet-owt-7be5be79.pth"
_FID_INCEPTION = "weights-inception-2015-12-05-6726825d.pth"
_CLIP_MODEL = "openai/clip-vit-base-patch16"


def _hub_checkpoint(filename: str) -> Path | None:
    path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    return path if path.is_file() else None


def _rgb(x: torch.Tensor, size: int) -> torch.Tensor:
    """(M, C, H, W) in [0, 1] -> (M, 3, size, size): perceptual nets expect RGB at a usable resolution."""
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


def lpips(baseline: torch.Tensor, other: torch.Tensor, video: bool | None = None,
          weights: str | os.PathLike | None = None) -> float | str:
    """LPIPS (AlexNet) against the baseline, lower is closer. ``weights``: torchvision's AlexNet
    checkpoint file (``alexnet-owt-7be5be79.pth``); by default the copy in torch's hub cache. Without
    either, ``"lpips: skipped..."`` (nothing is downloaded)."""
    source = Path(weights) if weights is not None else _hub_checkpoint(_LPIPS_BACKBONE)
    if source is None or not source.is_file():
        return f"lpips: {SKIPPED_OFFLINE}" if weights is None else f"lpips: skipped: no file {str(weights)!r}"
    a, b = _pair(baseline, other, video)
    metric = _lpips_metric(str(source.resolve()))
    metric.reset()
    size = max(64, min(a.shape[-1], 256))
    return float(metric(_rgb(b, size), _rgb(a, size)))


@functools.lru_cache(maxsize=2)
def _lpips_metric(backbone: str) -> Any:
    """The LPIPS network with its AlexNet backbone read from ``backbone``, built once per file (a benchmark
    scores every method against the same baseline)."""
    import tempfile

    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    previous = torch.hub.get_dir()
    with tempfile.TemporaryDirectory() as hub:  # torchvision looks up the backbone by name in the hub dir
        (Path(hub) / "checkpoints").mkdir()
        (Path(hub) / "checkpoints" / _LPIPS_BACKBONE).symlink_to(backbone)
        torch.hub.set_dir(hub)
        try:
            return LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True)
        finally:
            torch.hub.set_dir(previous)


def fid(real: torch.Tensor, fake: torch.Tensor) -> float | str:
    """FID when torch-fidelity and its Inception weights are already on disk, else ``"fid: skipped..."``."""
    if _hub_checkpoint(_FID_INCEPTION) is None or importlib.util.find_spec("torch_fidelity") is None:
        return f"fid: {SKIPPED_OFFLINE}"
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(normalize=True)
    metric.update(_rgb(as_images(real), 299), real=True)
    metric.update(_rgb(as_images(fake), 299), real=False)
    return float(metric.compute())


def clip_score(images: torch.Tensor, prompts: list[str],
               model: str | os.PathLike | None = None) -> float | str:
    """CLIP score (100 x the mean of max(cos, 0) between image and prompt embeddings, as torchmetrics
    defines it) of images against their prompts. ``model``: a local CLIP folder (transformers format); by
    default the hub cache's copy of ``openai/clip-vit-base-patch16``. Without either, ``"clip: skipped..."``
    (nothing is downloaded)."""
    if model is not None:
        if not (Path(model) / "config.json").is_file():
            return f"clip: skipped: {str(model)!r} is not a CLIP model folder (no config.json)"
        folder = Path(model)
    else:
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(_CLIP_MODEL, "config.json")
        if not isinstance(config, str):
            return f"clip: {SKIPPED_OFFLINE}"
        folder = Path(config).parent
    clip, processor = _clip_model(str(folder))
    pixels = (_rgb(as_images(images), 224) * 255).to(torch.uint8)
    inputs = processor(text=list(prompts), images=list(pixels), return_tensors="pt", padding=True,
                       truncation=True)
    with torch.no_grad():
        image = _embedding(clip.get_image_features(pixel_values=inputs["pixel_values"]))
        text = _embedding(clip.get_text_features(input_ids=inputs["input_ids"],
                                                 attention_mask=inputs.get("attention_mask")))
    cosine = torch.nn.functional.cosine_similarity(image, text, dim=-1)
    return float(100 * cosine.clamp(min=0).mean())


@functools.lru_cache(maxsize=2)
def _clip_model(folder: str) -> tuple[Any, Any]:
    """CLIP model and processor from ``folder``, loaded once per folder."""
    from transformers import CLIPModel, CLIPProcessor

    return CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)


def _embedding(output: Any) -> torch.Tensor:
    """transformers 5 returns an output object whose pooler_output is the projected embedding; 4.x a
    tensor."""
    return output if torch.is_tensor(output) else output.pooler_output


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (M, D): |mu_a - mu_b|^2 +
    tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2), in float64 through symmetric eigendecompositions."""
    a, b = a.double(), b.double()
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"frechet_distance needs at least 2 samples per set, got {len(a)} and {len(b)}.")
    mu = (a.mean(0) - b.mean(0)).square().sum()
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(ca)
    root_a = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(root_a @ cb @ root_a).clamp(min=0).sqrt().sum()
    return float(mu + ca.trace() + cb.trace() - 2 * cross)
