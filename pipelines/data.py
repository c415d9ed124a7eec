"""Data for the embedded models: scikit-learn's handwritten digits and synthetic moving-digit videos.

Everything here is generated offline from ``sklearn.datasets.load_digits`` (1,797 8x8 images that ship
with scikit-learn), so training, evaluation and tests never need a network.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from accel.extras import require

#: Fraction of the digits held out for evaluation (judge, ViT and generation targets use the same split).
TEST_FRACTION = 0.2
#: Seed of the train/test split; changing it changes every reported number.
SPLIT_SEED = 0


@functools.lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    datasets = require("sklearn.datasets", "bench", "the digits the embedded models are scored on")
    data = datasets.load_digits()
    return data.images.astype(np.float32) / 16.0, data.target.astype(np.int64)  # (1797, 8, 8) in [0, 1]


def split_indices(split: str) -> np.ndarray:
    """Indices of the ``"train"``, ``"test"`` or ``"all"`` split (stratified, fixed seed)."""
    model_selection = require("sklearn.model_selection", "bench", "the digits' train/test split")
    _, labels = _raw_digits()
    idx = np.arange(len(labels))
    if split == "all":
        return idx
    train, test = model_selection.train_test_split(idx, test_size=TEST_FRACTION, random_state=SPLIT_SEED,
                                                   stratify=labels)
    if split == "train":
        return np.sort(train)
    if split == "test":
        return np.sort(test)
    raise ValueError(f"Unknown digits split {split!r}; accepted: 'train', 'test', 'all'.")


def resize_digits(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of (N, 1, h, w) images to (N, 1, size, size), kept in [0, 1]."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


def load_digit_images(size: int = 16, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Digits as ``(images (N, 1, size, size) in [0, 1], labels (N,))`` for one split."""
    images, labels = _raw_digits()
    idx = split_indices(split)
    x = torch.from_numpy(images[idx]).unsqueeze(1)  # (N, 1, 8, 8)
    return resize_digits(x, size), torch.from_numpy(labels[idx])


def moving_digit_videos(
    digits: torch.Tensor,
    num_frames: int,
    canvas: int,
    generator: torch.Generator,
    min_speed: float = 1.0,
    max_speed: float = 3.0,
) -> torch.Tensor:
    """Renders each digit translating on a black canvas and bouncing off its walls.

    Args:
        digits: (N, 1, d, d) digit images in [0, 1], already at the size they are drawn (d < canvas).
        num_frames: frames per video.
        canvas: side of the square canvas in pixels.
        generator: seeds start positions and velocities, so videos are reproducible.
        min_speed, max_speed: speed range in pixels per frame along each axis.

    Returns:
        (N, F, canvas, canvas) videos in [0, 1].
    """
    n, _, d, _ = digits.shape
    room = canvas - d  # the top-left corner moves in [0, room]
    if room <= 0:
        raise ValueError(f"moving_digit_videos needs digits smaller than the canvas, got digit {d} >= canvas {canvas}.")
    start = torch.rand(n, 2, generator=generator) * room
    speed = min_speed + torch.rand(n, 2, generator=generator) * (max_speed - min_speed)
    sign = torch.where(torch.rand(n, 2, generator=generator) < 0.5, -1.0, 1.0)
    t = torch.arange(num_frames, dtype=torch.float32)
    # Unfolded position reflected into [0, room]: a triangle wave is exactly a bounce off both walls.
    raw = start[:, None, :] + (sign * speed)[:, None, :] * t[None, :, None]  # (N, F, 2)
    period = 2 * room
    pos = torch.remainder(raw, period)
    pos = torch.where(pos > room, period - pos, pos)
    return _paste(digits, pos, canvas)


def _paste(digits: torch.Tensor, pos: torch.Tensor, canvas: int) -> torch.Tensor:
    """Draws digits at sub-pixel top-left positions ``pos`` (N, F, 2 as y, x) with bilinear sampling."""
    n, _, d, _ = digits.shape
    num_frames = pos.shape[1]
    # Sample the digit at canvas coordinates shifted by the position: grid_sample does sub-pixel motion,
    # so movement is smooth rather than jumping by whole pixels.
    coords = torch.arange(canvas, dtype=torch.float32)
    yy = coords[None, None, :, None] - pos[..., 0, None, None]  # (N, F, canvas, 1)
    xx = coords[None, None, None, :] - pos[..., 1, None, None]  # (N, F, 1, canvas)
    yy, xx = torch.broadcast_tensors(yy, xx)
    # Normalise digit-pixel coordinates to [-1, 1] for grid_sample (align_corners=False convention).
    grid = torch.stack([(2 * xx + 1) / d - 1, (2 * yy + 1) / d - 1], dim=-1)  # (N, F, H, W, 2)
    src = digits.repeat_interleave(num_frames, dim=0)  # (N*F, 1, d, d)
    out = F.grid_sample(src, grid.reshape(n * num_frames, canvas, canvas, 2), mode="bilinear",
                        padding_mode="zeros", align_corners=False)
    return out.reshape(n, num_frames, canvas, canvas).clamp(0, 1)


def crop_digit(frames: torch.Tensor, box: int, size: int) -> torch.Tensor:
    """Crops a ``box``-pixel square centred on each frame's intensity centroid and resizes it to ``size``.

    Used to judge video frames with the image judge: the digit is found where the ink is, so a frame is
    classified by its content, not by where the digit happens to be.

    Args:
        frames: (M, H, W) in [0, 1].
        box: side of the crop in pixels (the digit's drawn size in the video data).
        size: side of the output (the judge's input size).

    Returns:
        (M, 1, size, size) crops in [0, 1].
    """
    m, h, w = frames.shape
    mass = frames.clamp(min=0).flatten(1).sum(1).clamp(min=1e-6)  # (M,)
    ys = torch.arange(h, dtype=frames.dtype)
    xs = torch.arange(w, dtype=frames.dtype)
    cy = (frames.sum(2) * ys).sum(1) / mass
    cx = (frames.sum(1) * xs).sum(1) / mass
    # The crop's top-left, kept inside the frame so a digit at a wall is not cut off by padding.
    top = (cy - box / 2 + 0.5).round().clamp(0, h - box).long()
    left = (cx - box / 2 + 0.5).round().clamp(0, w - box).long()
    crops = torch.stack([frames[i, top[i]:top[i] + box, left[i]:left[i] + box] for i in range(m)])
    return resize_digits(crops.unsqueeze(1), size)
