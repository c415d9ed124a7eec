"""The digit judge (a small CNN) and the digits ViT (timm), saved as safetensors + JSON.

The judge decides whether a generated digit is the digit it was conditioned on; it is trained on real
held-in digits at the image DiT's resolution (16x16) with small random shifts, rotations and scalings, so
that it also reads generated digits and digit crops of video frames. Both classifiers take (N, 1, 16, 16)
images in [0, 1].
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class DigitJudge(nn.Module):
    """Two conv stages + MLP head; maps (N, 1, S, S) images in [0, 1] to (N, 10) logits."""

    def __init__(self, image_size: int = 16, width: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.image_size = image_size

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1),
                                 nn.ReLU(), nn.MaxPool2d(2))

        self.features = nn.Sequential(stage(1, width), stage(width, 2 * width))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3),
                                  nn.Linear(2 * width * (image_size // 4) ** 2, 128), nn.ReLU(),
                                  nn.Linear(128, num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.image_size, self.image_size):
            # Any other resolution is resized, so that a judge call never fails on a size mismatch.
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False)
        return self.head(self.features(images * 2 - 1))


def build_vit(kwargs: dict[str, Any]) -> nn.Module:
    """A timm ViT from create_model kwargs (``model_name`` plus overrides), never downloading weights."""
    import timm

    kwargs = dict(kwargs)
    name = kwargs.pop("model_name")
    return timm.create_model(name, pretrained=False, **kwargs)


def save_classifier(model: nn.Module, folder: Path, config: dict[str, Any]) -> None:
    """Writes ``model.safetensors`` and ``config.json`` (the constructor arguments) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"No {CONFIG_FILE} in {folder}; a classifier folder holds {CONFIG_FILE} and "
                                f"{WEIGHTS_FILE}. Train one with accel.pipelines.train.")
    return json.loads(path.read_text())


def load_weights(model: nn.Module, path: Path) -> nn.Module:
    """Loads safetensors weights strictly (a mismatch names the missing and unexpected keys)."""
    model.load_state_dict(load_file(str(path)), strict=True)
    return model


def load_judge(folder: Path, device: str | torch.device = "cpu") -> DigitJudge:
    """The judge saved in ``folder`` (config.json + model.safetensors), in eval mode."""
    config = read_config(folder)
    model = DigitJudge(**config["kwargs"])
    return load_weights(model, Path(folder) / WEIGHTS_FILE).to(device).eval()


def load_vit(folder: Path, device: str | torch.device = "cpu") -> nn.Module:
    """The timm ViT saved in ``folder`` (create_model kwargs in config.json), in eval mode."""
    config = read_config(folder)
    model = build_vit(config["kwargs"])
    return load_weights(model, Path(folder) / WEIGHTS_FILE).to(device).eval()


def augment(images: torch.Tensor, generator: torch.Generator, max_shift: float = 0.15,
            max_rotate: float = 0.25, scale_range: tuple[float, float] = (0.85, 1.15)) -> torch.Tensor:
    """Random affine jitter of (N, 1, S, S) images: makes classifiers robust to off-centre generated digits."""
    n = images.shape[0]
    angle = (torch.rand(n, generator=generator) * 2 - 1) * max_rotate
    scale = scale_range[0] + torch.rand(n, generator=generator) * (scale_range[1] - scale_range[0])
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * max_shift * 2  # grid units span 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, padding_mode="zeros", align_corners=False)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Predicted classes (N,) for (N, 1, S, S) images, in batches so any N fits in memory."""
    device = next(model.parameters()).device
    out = [model(images[i:i + batch_size].to(device)).argmax(-1).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)
