"""How much a sparse-attention setting raises digits-video-dit's training loss before training adapts to it.

    python -m accel.benchmarks.train_loss_gap --batches 6        # VMoBA's threshold selection, tau 0.25-0.95
    python -m accel.benchmarks.train_loss_gap --specs vmoba:selection=threshold:tau=0.5

The shipped weights, forward only, on ``--batches`` fixed batches of the training objective
(``train_video_dit``'s flow loss on ``--clip-frames``-frame clips plus single frames, the same seeds for every
setting, so every setting sees the same clips, noise levels and noise). For each spec: the mean loss, its
excess over dense attention, and the attention density the patch reports. A setting whose excess is large
here starts a sparse training run that far above the dense one; this picks the settings worth a training
run (``train_video_dit --attention SPEC``) without paying for one per setting.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

DEFAULT_SPECS = tuple(f"vmoba:selection=threshold:tau={tau}" for tau in (0.25, 0.4, 0.55, 0.7, 0.85, 0.95))


def batch_losses(model: Any, digits: torch.Tensor, labels: torch.Tensor, batches: int, clip_frames: int,
                 clip_batch: int, image_batch: int, seed: int) -> list[float]:
    """The flow loss of ``batches`` batches of ``digits`` drawn with generator seeds ``seed, seed + 1...``."""
    from accel.pipelines.train.train_video_dit import flow_loss, sample_batch

    losses = []
    with torch.no_grad():
        for b in range(batches):
            gen = torch.Generator().manual_seed(seed + b)
            images, y_img = sample_batch(digits, labels, image_batch, 1, gen)
            clips, y_clip = sample_batch(digits, labels, clip_batch, clip_frames, gen)
            loss = flow_loss(model, images, y_img, gen, 0.0) + flow_loss(model, clips, y_clip, gen, 0.0)
            losses.append(float(loss))
    return losses


def measure(specs: list[str], weights: Path, batches: int, clip_frames: int, clip_batch: int,
            image_batch: int, seed: int) -> list[dict[str, Any]]:
    from accel.pipelines.data import load_digit_images
    from accel.pipelines.train.train_video_dit import DIGIT, VideoModel, load_weights, sparse_attention_patch

    model = VideoModel().eval()
    load_weights(model, weights)
    digits, labels = load_digit_images(DIGIT, "train")
    batch = dict(batches=batches, clip_frames=clip_frames, clip_batch=clip_batch, image_batch=image_batch,
                 seed=seed)
    dense = batch_losses(model, digits, labels, **batch)
    dense_mean = sum(dense) / len(dense)
    rows = [{"spec": "dense", "loss": dense_mean, "excess": 0.0, "density": 1.0}]
    for spec in specs:
        patch = sparse_attention_patch(model, spec)
        try:
            losses = batch_losses(model, digits, labels, **batch)
            (report,) = patch.report().methods.values()
        finally:
            patch.remove()
        mean = sum(losses) / len(losses)
        rows.append({"spec": spec, "loss": mean, "excess": mean / dense_mean - 1,
                     "density": report.get("density")})
    return rows


def main(argv: list[str] | None = None) -> int:
    from accel.pipelines.train.common import WEIGHTS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specs", nargs="*", default=list(DEFAULT_SPECS), help="vmoba/adaspa specs")
    parser.add_argument("--weights", type=Path, default=WEIGHTS / "digits-video-dit")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--clip-frames", type=int, default=16)
    parser.add_argument("--clip-batch", type=int, default=2)
    parser.add_argument("--image-batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    rows = measure(args.specs, args.weights, args.batches, args.clip_frames, args.clip_batch,
                   args.image_batch, args.seed)
    print("| attention | density | loss | vs dense |\n|---|---|---|---|")
    for row in rows:
        density = "-" if row["density"] is None else f"{row['density']:.3f}"
        print(f"| {row['spec']} | {density} | {row['loss']:.4f} | {row['excess']:+.1%} |")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
