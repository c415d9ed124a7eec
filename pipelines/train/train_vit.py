"""Trains ``digits-vit``: a timm VisionTransformer (vit_tiny_patch16_224 family, resized) on 16x16 digits.

    .venv/bin/python -m accel.pipelines.train.train_vit [--epochs 80]

Writes ``pipelines/weights/digits-vit/`` (model.safetensors + config.json with the create_model kwargs).
"""

from __future__ import annotations

import argparse

from accel.pipelines.classifiers import build_vit, save_classifier
from accel.pipelines.train.common import WEIGHTS, seed_everything, write_train_info
from accel.pipelines.train.train_judge import held_out_accuracy, train_classifier

# 16x16 digits in 4x4 patches -> 16 tokens + a class token; 6 blocks of width 96 (3 heads of 32).
# (2x2 patches, 64 tokens, stayed near chance for 5 epochs and reached 46% after 25: too slow to train here.)
VIT_KWARGS = dict(model_name="vit_tiny_patch16_224", img_size=16, patch_size=4, in_chans=1, num_classes=10,
                  depth=6, embed_dim=96, num_heads=3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    gen = seed_everything(args.seed)
    model = build_vit(VIT_KWARGS)
    progress = train_classifier(model, args.epochs, args.batch_size, args.lr, gen)
    accuracy = held_out_accuracy(model)
    print(f"vit held-out top-1 {accuracy:.4f}", flush=True)
    folder = WEIGHTS / "digits-vit"
    save_classifier(model, folder, {"arch": "timm", "kwargs": VIT_KWARGS, "input": "(N, 1, 16, 16) in [0, 1]"})
    write_train_info(folder, {**vars(args), "held_out_top1": round(accuracy, 4),
                              "train_seconds": round(progress.elapsed(), 1)})


if __name__ == "__main__":
    main()
