"""Trains ``digits-dit``: a DiTTransformer2DModel denoising 16x16 digits (epsilon prediction).

    .venv/bin/python -m accel.pipelines.train.train_digits_dit [--steps 800]

Writes a diffusers pipeline folder to ``pipelines/weights/digits-dit/``.
"""

from __future__ import annotations

import argparse

import torch
from accel.pipelines.data import load_digit_images
from accel.pipelines.digits_dit import DigitsDiTPipeline
from accel.pipelines.train.common import EMA, WEIGHTS, Progress, cosine_lr, seed_everything, write_train_info
from accel.pipelines.train.common import optimizer_step, set_lr
from diffusers import DDPMScheduler, DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding

IMAGE_SIZE = 16
NUM_CLASSES = 10
NOISE_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
MODEL_CONFIG = dict(
    num_attention_heads=4, attention_head_dim=32, in_channels=1, out_channels=1, num_layers=8,
    sample_size=IMAGE_SIZE, patch_size=2, num_embeds_ada_norm=NUM_CLASSES, norm_num_groups=1,
)  # 8 blocks, dim 128, 64 tokens per image


def build_model() -> DiTTransformer2DModel:
    model = DiTTransformer2DModel(**MODEL_CONFIG)
    # diffusers gives every block its own label table and drops labels per block independently; the
    # unconditional branch of CFG needs *all* blocks to see the null label together, so labels are
    # dropped once per sample in the training loop instead.
    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0
    return model


def train(steps: int, batch_size: int, lr: float, label_dropout: float, seed: int) -> None:
    gen = seed_everything(seed)
    images, labels = load_digit_images(IMAGE_SIZE, "train")
    data = images * 2 - 1  # the model works in [-1, 1]
    model = build_model().train()
    ema = EMA(model, decay=0.999)
    noise_sched = DDPMScheduler(**NOISE_SCHEDULE)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    progress = Progress(steps)
    for step in range(steps):
        idx = torch.randint(0, len(data), (batch_size,), generator=gen)
        x0, y = data[idx], labels[idx].clone()
        y[torch.rand(batch_size, generator=gen) < label_dropout] = NUM_CLASSES  # null label for CFG
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, NOISE_SCHEDULE["num_train_timesteps"], (batch_size,), generator=gen)
        xt = noise_sched.add_noise(x0, noise, t)
        set_lr(opt, cosine_lr(step, steps, lr, warmup=50))
        loss = torch.nn.functional.mse_loss(model(xt, timestep=t, class_labels=y).sample, noise)
        optimizer_step(opt, loss, model, step, ema)
        progress.log(step, loss.item())
    save(ema.model, {"steps": steps, "batch_size": batch_size, "lr": lr, "label_dropout": label_dropout,
                     "seed": seed, "train_seconds": round(progress.elapsed(), 1), "model": MODEL_CONFIG})


def make_sampler() -> DDPMScheduler:
    """The shipped sampler: ancestral DDPM, "trailing" spacing (50 steps start at the last trained timestep,
    i.e. from pure noise), clip_sample keeping x0 predictions in the trained [-1, 1] range. Measured at 50
    steps it beat deterministic DDIM and DPM-Solver clearly on judge accuracy for this model."""
    return DDPMScheduler(**NOISE_SCHEDULE, clip_sample=True, timestep_spacing="trailing")


def save(model: DiTTransformer2DModel, info: dict) -> None:
    scheduler = make_sampler()
    pipe = DigitsDiTPipeline(transformer=model.eval(), scheduler=scheduler)
    folder = WEIGHTS / "digits-dit"
    pipe.save_pretrained(folder, safe_serialization=True)
    write_train_info(folder, {**info, "sampler": "DDPMScheduler(ancestral, trailing)"})
    print(f"saved {folder}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--label-dropout", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train(args.steps, args.batch_size, args.lr, args.label_dropout, args.seed)


if __name__ == "__main__":
    main()
