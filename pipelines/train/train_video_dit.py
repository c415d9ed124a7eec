"""Trains ``digits-video-dit``: a small WanTransformer3DModel on synthetic bouncing digits (flow matching).

    .venv/bin/python -m accel.pipelines.train.train_video_dit [--steps 450]

Each step mixes single frames (F=1, cheap: teaches digit shapes) and short clips (F=4, 1,024 tokens:
teach motion); longer clips were too slow to train on 2 CPU cores. Inference runs longer clips
(16 frames x 32x32 px = 4,096 tokens); 3D RoPE is relative, so the temporal extrapolation is measured
by ``accel.pipelines.evaluate`` rather than assumed.
Writes a diffusers pipeline folder to ``pipelines/weights/digits-video-dit/``.

``--attention vmoba[:key=value...]`` (or ``adaspa[:...]``) trains through VMoBA's (AdaSpa's) block-sparse
attention (``training=True``; settings in accel's spec syntax, e.g. ``vmoba:selection=threshold:tau=0.25``);
``--log FILE`` writes each step's loss and seconds as JSON lines, so a dense and a sparse run can be
compared step for step.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from accel.pipelines.data import load_digit_images, moving_digit_videos
from accel.pipelines.digits_video import DigitLabelEmbedder, DigitsVideoPipeline
from accel.pipelines.train.common import EMA, WEIGHTS, Progress, cosine_lr, seed_everything, write_train_info
from accel.pipelines.train.common import optimizer_step, set_lr
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

CANVAS = 32  # frame side in pixels
DIGIT = 16  # drawn digit side: the judge's input size, so a centroid crop needs no resizing
NUM_CLASSES = 10
EMBED_CONFIG = dict(num_classes=NUM_CLASSES, num_tokens=4, text_dim=32)
MODEL_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=1, out_channels=1,
    text_dim=EMBED_CONFIG["text_dim"], freq_dim=64, ffn_dim=384, num_layers=4, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", rope_max_seq_len=256,
)  # 256 tokens per 32x32 frame, width 128


class VideoModel(torch.nn.Module):
    """Transformer + label table trained together (one module so that one EMA and optimizer cover both)."""

    def __init__(self) -> None:
        super().__init__()
        self.transformer = WanTransformer3DModel(**MODEL_CONFIG)
        self.labels = DigitLabelEmbedder(**EMBED_CONFIG)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.transformer(x, timestep=sigma * 1000, encoder_hidden_states=self.labels(y)).sample


def flow_loss(model: VideoModel, videos: torch.Tensor, labels: torch.Tensor, gen: torch.Generator,
              label_dropout: float) -> torch.Tensor:
    """Rectified-flow loss on (B, F, H, W) videos in [0, 1]: x_s = (1-s) x0 + s noise, target noise - x0."""
    x0 = (videos * 2 - 1).unsqueeze(1)  # (B, 1, F, H, W)
    b = x0.shape[0]
    y = labels.clone()
    y[torch.rand(b, generator=gen) < label_dropout] = NUM_CLASSES
    # Logit-normal sigmas weight the middle of the trajectory, where most of the content is decided.
    sigma = torch.sigmoid(torch.randn(b, generator=gen))
    noise = torch.randn(x0.shape, generator=gen)
    s = sigma.view(b, 1, 1, 1, 1)
    xs = (1 - s) * x0 + s * noise
    return torch.nn.functional.mse_loss(model(xs, sigma, y), noise - x0)


def sample_batch(digits: torch.Tensor, labels: torch.Tensor, size: int, frames: int,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.randint(0, len(digits), (size,), generator=gen)
    return moving_digit_videos(digits[idx], frames, CANVAS, gen), labels[idx]


def sparse_attention_patch(model: VideoModel, spec: str) -> Any:
    """``--attention``: ``dense`` (no patch), or a VMoBA or AdaSpa spec attached to the transformer in
    training mode."""
    import accel
    from accel.methods.adaspa import AdaSpaConfig
    from accel.methods.vmoba import VMoBAConfig
    from accel.registry import parse_method

    if spec == "dense":
        return None
    config = parse_method(spec)
    if not isinstance(config, (VMoBAConfig, AdaSpaConfig)):
        raise SystemExit("--attention takes 'dense', a vmoba spec (vmoba:selection=threshold:tau=0.25) or an "
                         f"adaspa spec (adaspa:sparsity=0.8:search_every=20), got {spec!r}.")
    return accel.patch(model.transformer, config.replace(training=True))


def train(steps: int, image_batch: int, clip_batch: int, clip_frames: int, lr: float, label_dropout: float,
          seed: int, folder: Path, save_every: int, init: Path | None = None, attention: str = "dense",
          log: Path | None = None) -> None:
    gen = seed_everything(seed)
    digits, labels = load_digit_images(DIGIT, "train")
    model = VideoModel().train()
    if init is not None:
        load_weights(model, init)
    ema = EMA(model, decay=0.998, warm_up=init is None)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    patch = sparse_attention_patch(model, attention)  # after the EMA copy: the copy stays unpatched
    progress = Progress(steps)
    log_file = None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)  # e.g. bench-out/... on a fresh checkout
        log_file = open(log, "w")
    for step in range(steps):
        start = time.perf_counter()
        set_lr(opt, cosine_lr(step, steps, lr, warmup=50))
        images, y_img = sample_batch(digits, labels, image_batch, 1, gen)
        clips, y_clip = sample_batch(digits, labels, clip_batch, clip_frames, gen)
        loss_img = flow_loss(model, images, y_img, gen, label_dropout)
        loss_clip = flow_loss(model, clips, y_clip, gen, label_dropout)
        loss = loss_img + loss_clip
        optimizer_step(opt, loss, model, step, ema)
        progress.log(step, loss.item(), image=loss_img.item(), clip=loss_clip.item())
        if log_file is not None:
            row = {"step": step, "loss": loss.item(), "image": loss_img.item(), "clip": loss_clip.item(),
                   "seconds": time.perf_counter() - start}
            log_file.write(json.dumps(row) + "\n")
            log_file.flush()
        if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            # Snapshots let a long CPU run be evaluated (and kept) before it ends.
            save(ema.model, folder / f"step-{step + 1}", {"steps_done": step + 1, "of_steps": steps})
    if patch is not None:
        (report,) = patch.report().methods.values()
        print(f"attention: {attention}, density {report.get('density')}", flush=True)
        patch.remove()
    if log_file is not None:
        log_file.close()
    save(ema.model, folder, {"attention": attention, "init": str(init) if init else None, "steps": steps, "image_batch": image_batch, "lr": lr, "label_dropout": label_dropout,
                     "seed": seed, "train_seconds": round(progress.elapsed(), 1), "model": MODEL_CONFIG,
                     "canvas": CANVAS, "digit": DIGIT, "clip_batch": clip_batch, "train_clip_frames": [1, clip_frames]})


def load_weights(model: VideoModel, folder: Path) -> None:
    """Continue from a saved pipeline folder (its EMA weights; the optimizer starts fresh with a warm-up)."""
    pipe = DigitsVideoPipeline.from_pretrained(folder)
    model.transformer.load_state_dict(pipe.transformer.state_dict())
    model.labels.load_state_dict(pipe.label_embedder.state_dict())


def save(model: VideoModel, folder: Path, info: dict) -> None:
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    pipe = DigitsVideoPipeline(transformer=model.transformer.eval(), label_embedder=model.labels.eval(),
                               scheduler=scheduler)
    pipe.save_pretrained(folder, safe_serialization=True)
    write_train_info(folder, {**info, "sampler": "FlowMatchEulerDiscreteScheduler(shift=1)"})
    print(f"saved {folder}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--image-batch", type=int, default=32)
    parser.add_argument("--clip-batch", type=int, default=4)
    parser.add_argument("--clip-frames", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--label-dropout", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=WEIGHTS / "digits-video-dit", help="pipeline folder to write")
    parser.add_argument("--save-every", type=int, default=0, help="also save EMA snapshots to OUT/step-N")
    parser.add_argument("--init", type=Path, default=None,
                        help="start from this pipeline folder's weights (continue an earlier run)")
    parser.add_argument("--attention", default="dense",
                        help="dense, or vmoba/adaspa with settings (vmoba:selection=threshold:tau=0.25, "
                             "adaspa:sparsity=0.8:search_every=20)")
    parser.add_argument("--log", type=Path, default=None,
                        help="write each step's loss and seconds (JSON lines)")
    args = parser.parse_args()
    train(args.steps, args.image_batch, args.clip_batch, args.clip_frames, args.lr, args.label_dropout, args.seed,
          args.out, args.save_every, args.init, args.attention, args.log)


if __name__ == "__main__":
    main()
