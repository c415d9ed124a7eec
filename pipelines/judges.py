"""Task metrics of the embedded digit generators, scored by the judges trained beside them.

    from accel.pipelines import judges
    judges.judge_accuracy(images, labels)     # fraction classified as their conditioning digit
    judges.caption_scores(images, prompts)    # digits-pixart: digit, attributes, FID-digits

The model-independent metrics (PSNR, SSIM, top-1, Fréchet distance, LPIPS/FID/CLIP) are in
``accel.metrics``; what lives here knows the embedded judges and the digit data.
"""

from __future__ import annotations

from typing import Any

import torch

from accel.metrics import as_images, frechet_distance, predict, top1

_JUDGE: dict[str, torch.nn.Module] = {}


def _embedded_judge(name: str) -> torch.nn.Module:
    """An embedded judge, loaded once per process (it is read-only, so sharing it is safe)."""
    if name not in _JUDGE:
        from accel.pipelines import load

        _JUDGE[name] = load(name)
    return _JUDGE[name]


def load_judge_model() -> torch.nn.Module:
    """The embedded digit judge of the 16x16 digit generators."""
    return _embedded_judge("digits-judge")


@torch.no_grad()
def judge_predictions(images_or_frames: torch.Tensor, judge: torch.nn.Module | None = None,
                      video: bool | None = None, digit_box: int = 16) -> torch.Tensor:
    """The judge's digit for every image, or every frame of every video: (N,) or (N, F).

    Args:
        images_or_frames: images (N, 1, H, W) / (N, H, W) or videos (N, F, H, W) in [0, 1].
        judge: a classifier on (M, 1, 16, 16) in [0, 1]; the embedded judge when None.
        video: force the video reading of a 4-D tensor (see ``as_images``).
        digit_box: for frames larger than the judge's input, the side of the crop taken around the ink's
            centroid (the video data draws 16 px digits on a larger canvas).
    """
    from accel.pipelines.data import crop_digit

    judge = judge or load_judge_model()
    x = torch.as_tensor(images_or_frames).detach().float().cpu()
    is_video = video if video is not None else (x.ndim == 5 or (x.ndim == 4 and x.shape[1] not in (1, 3)))
    frames = as_images(x, video=is_video)  # (M, 1, H, W)
    size = getattr(judge, "image_size", 16)
    if frames.shape[-1] > size and frames.shape[-1] > digit_box:
        frames = crop_digit(frames[:, 0], box=digit_box, size=size)
    preds = predict(judge, frames)
    return preds.reshape(x.shape[0], -1) if is_video else preds


def judge_accuracy(images_or_frames: torch.Tensor, labels: Any, judge: torch.nn.Module | None = None,
                   video: bool | None = None, digit_box: int = 16) -> float:
    """Fraction of generated digits the judge classifies as their conditioning label; for video every
    frame is judged against its video's label (arguments as :func:`judge_predictions`)."""
    labels = torch.as_tensor(labels).reshape(-1)
    preds = judge_predictions(images_or_frames, judge, video, digit_box).reshape(-1)
    if len(preds) % max(1, len(labels)):
        raise ValueError(f"judge_accuracy got {len(labels)} labels for "
                         f"{tuple(torch.as_tensor(images_or_frames).shape)} inputs.")
    return float((preds == labels.repeat_interleave(len(preds) // len(labels))).float().mean())


def label_consistency(videos: torch.Tensor, judge: torch.nn.Module | None = None) -> float:
    """Mean over videos of the share of frames the judge reads as that video's most frequent digit:
    1.0 when no digit changes identity from frame to frame (whether or not it is the prompted one)."""
    preds = judge_predictions(videos, judge, video=True)  # (N, F)
    majority = preds.mode(dim=1).values
    return float((preds == majority[:, None]).float().mean())


# ---- digits-pixart: does each picture show what its prompt says, and do pictures vary like real ones ----

def load_canvas_judge() -> torch.nn.Module:
    """The judge of ``digits-pixart``'s 32x32 pictures (any size, position, slant, stroke)."""
    return _embedded_judge("digits-pixart-judge")


@torch.no_grad()
def judge_features(images: torch.Tensor, judge: torch.nn.Module | None = None) -> torch.Tensor:
    """The judge's penultimate activations (N, 128) of (N, 1, H, W) pictures: the feature space of
    FID-digits (an Inception network would have to be downloaded and knows nothing of digits)."""
    judge = judge or load_canvas_judge()
    x = as_images(torch.as_tensor(images).detach().float().cpu())[:, :1]
    if x.shape[-1] != judge.image_size:
        x = torch.nn.functional.interpolate(x, size=(judge.image_size,) * 2, mode="bilinear",
                                            align_corners=False)
    return judge.head[:-1](judge.features(x * 2 - 1))


def fid_digits(generated: torch.Tensor, real: torch.Tensor, judge: torch.nn.Module | None = None) -> float:
    """FID-digits: Fréchet distance of the canvas judge's features, generated vs real pictures. Collapsed
    samples (every seed alike) score far above real-vs-real, even when each is classified right."""
    judge = judge or load_canvas_judge()
    return frechet_distance(judge_features(generated, judge), judge_features(real, judge))


@torch.no_grad()
def caption_scores(images: torch.Tensor, prompts: list[str], real_per_prompt: int = 8) -> dict[str, float]:
    """digits-pixart's task metrics for pictures generated from ``prompts`` (one prompt per picture):
    ``judge_acc`` (digit as prompted, by the canvas judge), one accuracy per stated attribute
    (``thickness``, ``slant``, ``size``, ``position``, read back by the rules that drew the training data),
    their mean ``attr_acc``, and ``fid_digits`` against held-out real digits drawn as the prompts say."""
    from accel.pipelines import captions

    x = as_images(torch.as_tensor(images).detach().float().cpu())[:, :1]
    if len(x) != len(prompts):
        raise ValueError(f"caption_scores got {len(prompts)} prompts for {len(x)} pictures.")
    stated = [captions.parse(p) for p in prompts]
    judge = load_canvas_judge()
    scores: dict[str, float] = {}
    with_digit = [i for i, s in enumerate(stated) if "digit" in s]
    if with_digit:
        labels = torch.tensor([stated[i]["digit"] for i in with_digit])
        scores["judge_acc"] = top1(judge, x[with_digit], labels)
    attributes = captions.attribute_accuracy(x, prompts)
    scores.update(attributes)
    if attributes:
        scores["attr_acc"] = sum(attributes.values()) / len(attributes)
    if len(x) >= 2:  # a covariance needs two samples
        unique = list(dict.fromkeys(prompts))
        real = captions.real_pictures(unique, real_per_prompt * max(1, len(prompts) // len(unique)))
        scores["fid_digits"] = fid_digits(x, real, judge)
    return scores
