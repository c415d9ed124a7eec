"""Captioned digit pictures for ``digits-pixart``: each sklearn digit drawn on a 32x32 canvas with known
stroke thickness, slant, size and position, and a caption that says so ("a thick handwritten 7, slanted
right, small, top left").

The same module measures those attributes back from any picture (ink mass, second moments, centroid),
so generated samples are checked for following the caption with the rules that made the training data.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

CANVAS = 32
#: Glyph resolution the 8x8 digits are upsampled to before thickening or thinning the strokes.
GLYPH = 32
THICKNESS = ("thin", "thick")
SLANT = ("left", "upright", "right")
SIZE = ("small", "large")
POSITION = ("top left", "top right", "bottom left", "bottom right", "center")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: Every word a caption can contain (the tokenizer has one token for each).
VOCABULARY = (
    "a", "an", "handwritten", "digit", "number", "slanted", "upright", "in", "the", "at", "corner",
    *THICKNESS, *SLANT, *SIZE, "top", "bottom", "center", *NUMBER_WORDS, *(str(d) for d in range(10)),
)
#: Shear per slant class (x shifts by this fraction of the height from bottom to top).
SHEAR = {"left": -0.35, "upright": 0.0, "right": 0.35}
#: Drawn glyph side in pixels per size class, and where its centre sits per position.
SIDE = {"small": 15.0, "large": 26.0}
_MARGIN = 8.5
CENTRE = {
    "top left": (_MARGIN, _MARGIN), "top right": (_MARGIN, CANVAS - _MARGIN),
    "bottom left": (CANVAS - _MARGIN, _MARGIN), "bottom right": (CANVAS - _MARGIN, CANVAS - _MARGIN),
    "center": (CANVAS / 2, CANVAS / 2),
}  # (y, x)


@dataclass(frozen=True)
class Attributes:
    """What one picture shows; ``position`` is always "center" for large digits (no room to move)."""

    digit: int
    thickness: str
    slant: str
    size: str
    position: str

    def caption(self, rng: random.Random | None = None, keep: float = 1.0) -> str:
        """The caption; with ``rng`` each attribute is left out with probability ``1 - keep`` and the digit
        is written as a numeral or a word, so prompts that mention fewer attributes also work."""
        rng = rng or random.Random(0)

        def said() -> bool:
            return keep >= 1.0 or rng.random() < keep

        digit = str(self.digit) if rng.random() < 0.7 else NUMBER_WORDS[self.digit]
        head = ["a"]
        if said():
            head.append(self.thickness)
        head += ["handwritten", digit]
        parts = [" ".join(head)]
        if said():
            parts.append("upright" if self.slant == "upright" else f"slanted {self.slant}")
        if said():
            parts.append(self.size)
        if self.size == "small" and said():
            parts.append(self.position)
        return ", ".join(parts)


def sample_attributes(labels: torch.Tensor, generator: torch.Generator) -> list[Attributes]:
    """Uniform attributes for each label (large digits centred)."""
    n = len(labels)

    def pick(options: tuple[str, ...]) -> list[str]:
        return [options[i] for i in torch.randint(0, len(options), (n,), generator=generator)]

    thickness, slant, size, position = pick(THICKNESS), pick(SLANT), pick(SIZE), pick(POSITION)
    return [Attributes(int(d), t, s, z, p if z == "small" else "center")
            for d, t, s, z, p in zip(labels.tolist(), thickness, slant, size, position)]


def _glyphs(digits: torch.Tensor, thickness: list[str]) -> torch.Tensor:
    """(N, 1, 8, 8) digits in [0, 1] → (N, 1, GLYPH, GLYPH) glyphs with thin or thick strokes."""
    big = F.interpolate(digits, size=(GLYPH, GLYPH), mode="bicubic", align_corners=False).clamp(0, 1)
    thick = F.max_pool2d(big, 3, stride=1, padding=1)  # dilation
    thin = -F.max_pool2d(-big, 3, stride=1, padding=1)  # erosion
    choose = torch.tensor([t == "thick" for t in thickness]).view(-1, 1, 1, 1)
    glyph = torch.where(choose, thick, thin)
    return ((glyph - 0.25) / 0.5).clamp(0, 1)  # crisper edges than the blurry 8x8 source


def render(digits: torch.Tensor, attributes: list[Attributes]) -> torch.Tensor:
    """Draws (N, 1, 8, 8) digits in [0, 1] as (N, 1, CANVAS, CANVAS) pictures with their attributes."""
    glyphs = _glyphs(digits, [a.thickness for a in attributes])
    rows = []
    for a in attributes:
        side = SIDE[a.size]
        cy, cx = CENTRE[a.position]
        # Canvas pixel (x, y) → glyph coordinates in [-1, 1]: undo the placement, then the shear about the
        # glyph's centre (a right slant moves the top to the right).
        s = CANVAS / side
        shear = SHEAR[a.slant]
        ox, oy = (2 * cx / CANVAS - 1), (2 * cy / CANVAS - 1)
        # x_g = s * (x_c - ox) + shear * s * (y_c - oy);  y_g = s * (y_c - oy)
        rows.append(torch.tensor([[s, shear * s, -s * ox - shear * s * oy], [0.0, s, -s * oy]]))
    theta = torch.stack(rows)
    grid = F.affine_grid(theta, [len(attributes), 1, CANVAS, CANVAS], align_corners=False)
    return F.grid_sample(glyphs, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp(0, 1)


# ---- measuring attributes back from pictures -------------------------------------------------------------

@dataclass(frozen=True)
class Measures:
    """Per-picture statistics of the ink (all (N,) tensors)."""

    ink: torch.Tensor  # total intensity
    cy: torch.Tensor  # centroid, pixels
    cx: torch.Tensor
    spread: torch.Tensor  # sqrt of the second moments' trace: the drawn size
    shear: torch.Tensor  # mu_xy / mu_yy: how far x moves per unit of y (negative: top to the right)


def measure(images: torch.Tensor) -> Measures:
    """Ink statistics of (N, 1, H, W) or (N, H, W) pictures in [0, 1]."""
    x = images.reshape(images.shape[0], images.shape[-2], images.shape[-1]).float().clamp(0, 1)
    n, h, w = x.shape
    mass = x.flatten(1).sum(1).clamp(min=1e-6)
    ys = torch.arange(h, dtype=x.dtype).view(1, h, 1)
    xs = torch.arange(w, dtype=x.dtype).view(1, 1, w)
    cy = (x * ys).flatten(1).sum(1) / mass
    cx = (x * xs).flatten(1).sum(1) / mass
    dy = ys - cy.view(n, 1, 1)
    dx = xs - cx.view(n, 1, 1)
    myy = (x * dy * dy).flatten(1).sum(1) / mass
    mxx = (x * dx * dx).flatten(1).sum(1) / mass
    mxy = (x * dx * dy).flatten(1).sum(1) / mass
    return Measures(ink=mass, cy=cy, cx=cx, spread=(myy + mxx).sqrt(), shear=mxy / myy.clamp(min=1e-6))



# ---- reading prompts and checking pictures against them ----------------------------------------------------

def parse(prompt: str) -> dict[str, Any]:
    """The attributes a prompt states (``digit``, ``thickness``, ``slant``, ``size``, ``position``); those
    it does not mention are absent. A prompt without a digit gives ``{}``."""
    text = " " + prompt.lower().replace(",", " ").replace(".", " ") + " "
    words = text.split()
    stated: dict[str, Any] = {}
    for d in range(10):
        if str(d) in words or NUMBER_WORDS[d] in words:
            stated["digit"] = d
            break
    for value in THICKNESS:
        if value in words:
            stated["thickness"] = value
    if "upright" in words:
        stated["slant"] = "upright"
    for value in ("left", "right"):
        if f" slanted {value} " in text:
            stated["slant"] = value
    for value in SIZE:
        if value in words:
            stated["size"] = value
    for value in POSITION:
        if f" {value} " in text:
            stated["position"] = value
    return stated if "digit" in stated else {}


#: Attributes read back by nearest reference mean (per digit); position by the nearest centre.
CHECKED = ("thickness", "slant", "size", "position")


def _statistics(m: Measures) -> dict[str, torch.Tensor]:
    # Ink per unit of drawn area does not depend on the size; log spread does not depend on the ink.
    return {"thickness": (m.ink / m.spread.clamp(min=1e-3) ** 2).log(), "slant": m.shear,
            "size": m.spread.clamp(min=1e-3).log()}


@functools.lru_cache(maxsize=1)
def reference_means(seed: int = 0, renders: int = 8) -> dict[str, torch.Tensor]:
    """Per digit and attribute value, the mean statistic over train-split renders: (10, values) tables."""
    from accel.pipelines.data import _raw_digits, split_indices

    images, labels = _raw_digits()
    idx = split_indices("train")
    x = torch.from_numpy(images[idx]).unsqueeze(1).repeat(renders, 1, 1, 1)
    y = torch.from_numpy(labels[idx]).repeat(renders)
    attrs = sample_attributes(y, torch.Generator().manual_seed(seed + 11))
    stats = _statistics(measure(render(x, attrs)))
    tables = {}
    for name, values in (("thickness", THICKNESS), ("slant", SLANT), ("size", SIZE)):
        table = torch.zeros(10, len(values))
        for d in range(10):
            for j, value in enumerate(values):
                keep = torch.tensor([a.digit == d and getattr(a, name) == value for a in attrs])
                table[d, j] = stats[name][keep].mean()
        tables[name] = table
    return tables


def read_attributes(images: torch.Tensor, digits: list[int]) -> list[dict[str, str]]:
    """Each picture's thickness, slant, size (nearest reference mean for its digit) and position."""
    m = measure(images)
    stats = _statistics(m)
    tables = reference_means()
    centres = torch.tensor([CENTRE[p] for p in POSITION]) * images.shape[-1] / CANVAS  # (5, 2) as (y, x)
    where = torch.stack([m.cy, m.cx], 1)
    position = torch.cdist(where, centres).argmin(1)
    out = []
    for i, d in enumerate(digits):
        read = {name: values[int((tables[name][d] - stats[name][i]).abs().argmin())]
                for name, values in (("thickness", THICKNESS), ("slant", SLANT), ("size", SIZE))}
        read["position"] = POSITION[int(position[i])]
        out.append(read)
    return out


def attribute_accuracy(images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    """Per attribute, the fraction of pictures whose prompt states it that show it (digit excluded: the
    judge scores that). Attributes no prompt states are left out."""
    stated = [parse(p) for p in prompts]
    digits = [s.get("digit", 0) for s in stated]
    read = read_attributes(images, digits)
    result = {}
    for name in CHECKED:
        hits = [r[name] == s[name] for s, r in zip(stated, read) if name in s]
        if hits:
            result[name] = sum(hits) / len(hits)
    return result


def real_pictures(prompts: list[str], per_prompt: int, split: str = "test", seed: int = 0) -> torch.Tensor:
    """Real digits of ``split`` drawn as each prompt says (unstated attributes random), ``per_prompt`` each:
    the reference set of the Fréchet distance."""
    from accel.pipelines.data import _raw_digits, split_indices

    images, labels = _raw_digits()
    idx = split_indices(split)
    x, y = torch.from_numpy(images[idx]).unsqueeze(1), torch.from_numpy(labels[idx])
    gen = torch.Generator().manual_seed(seed + 17)
    pics = []
    for prompt in prompts:
        stated = parse(prompt)
        pool = (y == stated["digit"]).nonzero().flatten() if "digit" in stated else torch.arange(len(y))
        chosen = pool[torch.randint(0, len(pool), (per_prompt,), generator=gen)]
        attrs = [_with(a, stated) for a in sample_attributes(y[chosen], gen)]
        pics.append(render(x[chosen], attrs))
    return torch.cat(pics)


def _with(a: Attributes, stated: dict[str, Any]) -> Attributes:
    merged = dataclasses.replace(a, **{k: v for k, v in stated.items() if k != "digit"})
    return merged if merged.size == "small" else dataclasses.replace(merged, position="center")


def random_prompts(count: int, seed: int) -> list[str]:
    """Captions drawn like the training captions (every attribute stated), for distribution metrics."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    labels = torch.arange(count) % 10
    return [a.caption(rng) for a in sample_attributes(labels, gen)]
