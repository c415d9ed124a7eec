"""Measures the embedded models against their targets and saves sample figures.

    .venv/bin/python -m accel.pipelines.evaluate                      # everything
    .venv/bin/python -m accel.pipelines.evaluate --only dit judge     # a subset

Targets: judge >= 97% and ViT top-1 >= 95% on the held-out digits; digits-dit judge accuracy >= 95% at
50 steps; digits-video-dit per-frame judge accuracy >= 85% at 4,096 tokens per video; digits-pixart at 20
steps: judge accuracy >= 95%, thickness and slant >= 85%, FID-digits within 2x of real-vs-real.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from accel.pipelines.data import load_digit_images
from accel.pipelines.generation import default_generation_kwargs, generate
from accel.pipelines.loading import load

from accel import metrics
from accel.pipelines import judges

FIGURES = Path("benchmarks/figures")


def eval_classifier(name: str) -> dict:
    images, labels = load_digit_images(16, "test")
    return {"model": name, "held_out_top1": metrics.top1(load(name), images, labels), "n": len(labels)}


def eval_dit(per_class: int, steps: int, guidance: float) -> dict:
    pipe = load("digits-dit")
    labels = [c for c in range(10) for _ in range(per_class)]
    start = time.perf_counter()
    images = generate(pipe, labels, seeds=list(range(len(labels))), steps=steps, guidance_scale=guidance)
    seconds = time.perf_counter() - start
    save_grid(images.reshape(10, per_class, *images.shape[-2:])[:, :10], FIGURES / "digits_dit_samples.png")
    return {"model": "digits-dit", "judge_accuracy": judges.judge_accuracy(images, labels), "n": len(labels),
            "steps": steps, "guidance_scale": guidance, "sampler": type(pipe.scheduler).__name__,
            "tokens_per_image": (pipe.transformer.config.sample_size // pipe.transformer.config.patch_size) ** 2,
            "seconds_total": round(seconds, 1)}


def eval_video(count: int, steps: int, guidance: float, num_frames: int,
               model: str = "digits-video-dit") -> dict:
    pipe = load(model)
    kwargs = default_generation_kwargs("digits-video-dit")
    kwargs.update(steps=steps, guidance_scale=guidance, num_frames=num_frames)
    labels = [i % 10 for i in range(count)]
    start = time.perf_counter()
    frames = generate(pipe, labels, seeds=list(range(count)), **kwargs)[:, :, 0]  # one channel: (N, F, H, W)
    seconds = time.perf_counter() - start
    tag = f"f{num_frames}"
    if model == "digits-video-dit":  # the shipped model's figure; other folders are compared, not shown
        save_grid(frames[: min(count, 10)], FIGURES / f"digits_video_frames_{tag}.png")
    tokens = pipe.num_tokens(num_frames, kwargs["height"], kwargs["width"])
    return {"model": model, "per_frame_judge_accuracy": judges.judge_accuracy(frames, labels),
            "label_consistency": judges.label_consistency(frames),
            "videos": count, "frames": num_frames, "size": [kwargs["height"], kwargs["width"]],
            "tokens_per_video": tokens, "steps": steps, "guidance_scale": guidance,
            "sampler": type(pipe.scheduler).__name__, "seconds_total": round(seconds, 1),
            "seconds_per_step_per_video": round(seconds / steps / count, 3),
            "motion_px_per_frame": round(mean_motion(frames), 2)}


def eval_pixart(count: int, steps: int, guidance: float, seed: int = 0, model: str = "digits-pixart") -> dict:
    """digits-pixart (or a pipeline folder of it, e.g. a training snapshot) on ``count`` captions drawn like
    the training captions (seeds 0..count-1): digit and attribute accuracy, FID-digits against held-out real
    digits drawn as prompted, and the same FID of a second real set (train-split digits) as the floor a
    perfect model would reach. The samples figure is written for the embedded model only."""
    from accel.pipelines import captions

    pipe = load(model)
    prompts = captions.random_prompts(count, seed=1000 + seed)
    start = time.perf_counter()
    images = torch.cat([generate(pipe, prompts[i:i + 50], seeds=list(range(i, min(i + 50, count))), steps=steps,
                                 guidance_scale=guidance) for i in range(0, count, 50)])
    seconds = time.perf_counter() - start
    scores = judges.caption_scores(images, prompts, real_per_prompt=1)
    test_real = captions.real_pictures(prompts, 1, "test")
    train_real = captions.real_pictures(prompts, 1, "train", seed=5)
    real_floor = judges.fid_digits(train_real, test_real)
    fid_generated = judges.fid_digits(images, test_real)
    if model == "digits-pixart":
        save_pixart_samples(pipe, steps, guidance)
    return {"model": model, **{k: round(v, 4) for k, v in scores.items()},
            "fid_digits": round(fid_generated, 2), "fid_digits_real_train_vs_test": round(real_floor, 2),
            "n": count, "steps": steps, "guidance_scale": guidance, "sampler": type(pipe.scheduler).__name__,
            "seconds_total": round(seconds, 1)}


def save_pixart_samples(pipe: object, steps: int, guidance: float, seeds: int = 8) -> None:
    """The model's own prompts (rows) at ``seeds`` seeds each (columns)."""
    from accel.calls import folder_prompts

    prompts = folder_prompts(pipe) or []
    rows = [generate(pipe, [p] * seeds, seeds=list(range(seeds)), steps=steps, guidance_scale=guidance)[:, 0]
            for p in prompts]
    save_grid(torch.stack(rows), FIGURES / "digits_pixart_samples.png", scale=3)
    (FIGURES / "digits_pixart_samples.txt").write_text(
        "Rows, top to bottom (seeds 0-7 left to right):\n" + "\n".join(prompts) + "\n")


def mean_motion(frames: torch.Tensor) -> float:
    """Average centroid displacement between consecutive frames, in pixels: shows the digits move."""
    h, w = frames.shape[-2:]
    mass = frames.sum((2, 3)).clamp(min=1e-6)
    cy = (frames.sum(3) * torch.arange(h)).sum(2) / mass
    cx = (frames.sum(2) * torch.arange(w)).sum(2) / mass
    return float(torch.sqrt(cy.diff(dim=1) ** 2 + cx.diff(dim=1) ** 2).mean())


def save_grid(tiles: torch.Tensor, path: Path, scale: int = 4) -> None:
    """Saves (rows, cols, H, W) tiles in [0, 1] as one PNG with 1-px gaps, upscaled ``scale`` times."""
    import PIL.Image

    rows, cols, h, w = tiles.shape
    canvas = torch.full((rows * (h + 1) + 1, cols * (w + 1) + 1), 0.35)
    for r in range(rows):
        for c in range(cols):
            canvas[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = tiles[r, c]
    path.parent.mkdir(parents=True, exist_ok=True)
    img = PIL.Image.fromarray((canvas.numpy() * 255).round().astype("uint8"), mode="L")
    img.resize((img.width * scale, img.height * scale), PIL.Image.NEAREST).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", default=["judge", "vit", "dit", "video", "pixart"],
                        choices=["judge", "vit", "dit", "video", "pixart"])
    parser.add_argument("--pixart-count", type=int, default=200)
    parser.add_argument("--pixart-steps", type=int, default=20)
    parser.add_argument("--pixart-guidance", type=float, default=4.5)
    parser.add_argument("--pixart-model", default="digits-pixart", help="embedded name or pipeline folder")
    parser.add_argument("--dit-per-class", type=int, default=20)
    parser.add_argument("--dit-steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--video-count", type=int, default=10)
    parser.add_argument("--video-steps", type=int, default=50)
    parser.add_argument("--video-frames", type=int, nargs="*", default=[16])
    parser.add_argument("--video-model", default="digits-video-dit", help="embedded name or pipeline folder")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    if "judge" in args.only:
        results.append(eval_classifier("digits-judge"))
    if "vit" in args.only:
        results.append(eval_classifier("digits-vit"))
    if "dit" in args.only:
        results.append(eval_dit(args.dit_per_class, args.dit_steps, args.guidance))
    if "video" in args.only:
        for frames in args.video_frames:
            results.append(eval_video(args.video_count, args.video_steps, args.guidance, frames,
                                      args.video_model))
    if "pixart" in args.only:
        results.append(eval_pixart(args.pixart_count, args.pixart_steps, args.pixart_guidance,
                                   model=args.pixart_model))
    for r in results:
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
