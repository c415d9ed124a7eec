"""Trains the digit judge (a small CNN) on real 16x16 digits with affine jitter.

    .venv/bin/python -m accel.pipelines.train.train_judge [--epochs 40]

Writes ``pipelines/weights/digits-judge/`` (model.safetensors + config.json) and prints held-out accuracy.
"""

from __future__ import annotations

import argparse

import torch
from accel.pipelines.classifiers import DigitJudge, augment, predict, save_classifier
from accel.pipelines.data import load_digit_images
from accel.pipelines.train.common import WEIGHTS, Progress, cosine_lr, seed_everything, write_train_info
from accel.pipelines.train.common import optimizer_step, set_lr

IMAGE_SIZE = 16
JUDGE_KWARGS = dict(image_size=IMAGE_SIZE, width=32, num_classes=10)


def train_classifier(model: torch.nn.Module, epochs: int, batch_size: int, lr: float,
                     gen: torch.Generator) -> Progress:
    """Cross-entropy training on the train split with affine jitter; shared by the judge and the ViT."""
    images, labels = load_digit_images(IMAGE_SIZE, "train")
    steps_per_epoch = (len(images) + batch_size - 1) // batch_size
    total = epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    progress = Progress(total, every=steps_per_epoch * 5)
    model.train()
    for step in range(total):
        if step % steps_per_epoch == 0:
            order = torch.randperm(len(images), generator=gen)
        idx = order[(step % steps_per_epoch) * batch_size:][:batch_size]
        x = augment(images[idx], gen)
        set_lr(opt, cosine_lr(step, total, lr, warmup=steps_per_epoch))
        loss = torch.nn.functional.cross_entropy(model(x), labels[idx], label_smoothing=0.05)
        optimizer_step(opt, loss, model, step, clip=None)
        progress.log(step, loss.item())
    return progress


def held_out_accuracy(model: torch.nn.Module) -> float:
    images, labels = load_digit_images(IMAGE_SIZE, "test")
    model.eval()
    return (predict(model, images) == labels).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    gen = seed_everything(args.seed)
    model = DigitJudge(**JUDGE_KWARGS)
    progress = train_classifier(model, args.epochs, args.batch_size, args.lr, gen)
    accuracy = held_out_accuracy(model)
    print(f"judge held-out accuracy {accuracy:.4f}", flush=True)
    folder = WEIGHTS / "digits-judge"
    save_classifier(model, folder, {"arch": "DigitJudge", "kwargs": JUDGE_KWARGS, "input": "(N, 1, 16, 16) in [0, 1]"})
    write_train_info(folder, {**vars(args), "held_out_accuracy": round(accuracy, 4),
                              "train_seconds": round(progress.elapsed(), 1)})


if __name__ == "__main__":
    main()
