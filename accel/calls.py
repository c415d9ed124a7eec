"""Pipeline calls built from the pipeline's own ``__call__`` signature: the one place that knows how to
call any diffusers pipeline (prompts or class labels, per-sample seeds, steps, guidance, sizes).

The benchmark, the demo and every offline step (BAC schedules, QuEST calibration, HierarchicalPrune's
sensitivity and distillation) build their calls here, so they run on the same kind of inputs.

    kwargs = build_call(pipe, ["a red fox"], seeds=[0], steps=20, height=512, width=512)
    calls = default_calls(pipe, seeds=[101, 102])   # calibration: built-in prompts or class labels
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: Prompts used when a text-conditioned pipeline is benchmarked without a prompt file: varied subjects,
#: counts, colours and layouts, so that caches and sparse patterns are not tuned to one scene.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "a red fox sitting in fresh snow, morning light",
    "a lighthouse on a rocky coast at dusk, waves crashing",
    "three ripe lemons on a blue ceramic plate, studio photo",
    "a busy night market street in the rain, neon signs",
    "an astronaut riding a horse on the moon, wide shot",
    "a watercolor painting of a quiet mountain lake",
    "a close-up portrait of an old fisherman, detailed wrinkles",
    "a vintage red bicycle leaning against a yellow wall",
)

Condition = int | str


#: Call parameters of pipelines that transform an input (image-to-image, inpainting, control, video-to-video).
INPUT_PARAMETERS = ("image", "mask_image", "control_image", "video")


class UnsupportedPipelineError(ValueError):
    """A pipeline whose call accel cannot build (it needs an input accel does not know how to make)."""


@dataclass(frozen=True)
class CallSignature:
    """What one pipeline's ``__call__`` takes, read from its signature."""

    pipeline: str
    conditioning: str  # "prompt" | "class_labels"
    parameters: frozenset[str]
    takes_any_keyword: bool  # the call has **kwargs

    @property
    def is_text(self) -> bool:
        return self.conditioning == "prompt"

    def accepts(self, name: str) -> bool:
        return name in self.parameters

    @property
    def is_video(self) -> bool:
        return "num_frames" in self.parameters


def call_signature(pipe: Any) -> CallSignature:
    """Read ``pipe.__call__``'s signature; a pipeline without prompts or class labels is refused."""
    call = getattr(pipe, "__call__", None)
    name = type(pipe).__name__
    try:
        params = inspect.signature(call).parameters
    except (TypeError, ValueError):
        raise UnsupportedPipelineError(
            f"{name} has no inspectable __call__; accel drives diffusers pipelines.") from None
    names = frozenset(params)
    if "prompt" in names:
        conditioning = "prompt"
    elif "class_labels" in names:
        conditioning = "class_labels"
    else:
        raise UnsupportedPipelineError(
            f"{name}'s call takes neither `prompt` nor `class_labels` (it takes: "
            f"{', '.join(params) or 'nothing'}); accel can drive text-conditioned and class-conditional "
            "pipelines. Call it yourself and patch its denoiser with accel.patch(pipe.transformer or "
            "pipe.unet).")
    needs = [p for p in INPUT_PARAMETERS if p in names]
    if needs:
        raise UnsupportedPipelineError(
            f"{name}'s call takes {', '.join(needs)}: it transforms an input accel cannot make up. accel "
            "drives text-to-image/video and class-conditional pipelines; call this one yourself and patch "
            "it with accel.patch.")
    required = tuple(
        p.name for p in params.values()
        if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        and p.name not in (conditioning, "self")
    )
    if required:
        raise UnsupportedPipelineError(
            f"{name}'s call needs {', '.join(required)}, which accel cannot build (it makes prompts or class "
            "labels, seeds, steps, guidance and sizes). Call the pipeline yourself and patch it with "
            "accel.patch.")
    any_keyword = any(p.kind is p.VAR_KEYWORD for p in params.values())
    return CallSignature(name, conditioning, names, any_keyword)


def _generators(seeds: Sequence[int]) -> list[torch.Generator]:
    # One generator per sample: a sample depends only on its own seed, not on the batch it ran in.
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def _check_conditions(sig: CallSignature, conditions: Sequence[Condition]) -> list[Condition]:
    conditions = list(conditions)
    if not conditions:
        raise ValueError("generate needs at least one prompt or class label.")
    want = str if sig.is_text else int
    wrong = [c for c in conditions if not isinstance(c, want) or isinstance(c, bool)]
    if wrong:
        what = "prompts (str)" if sig.is_text else "class labels (int)"
        raise ValueError(f"{sig.pipeline} is conditioned on {sig.conditioning}: pass {what}, "
                         f"got {wrong[0]!r}.")
    return conditions


def build_call(
    pipe: Any,
    conditions: Sequence[Condition],
    seeds: Sequence[int],
    steps: int | None = None,
    guidance_scale: float | None = None,
    *,
    negative_prompt: str | None = None,
    height: int | None = None,
    width: int | None = None,
    num_frames: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The keyword arguments of one pipeline call over ``conditions`` (one sample each).

    ``None`` leaves a setting at the pipeline's own default. ``negative_prompt``, sizes and frames are passed
    only where the pipeline takes them (a negative prompt given to a pipeline without one is an error, a
    size is not: class-conditional pipelines generate at their trained size).
    """
    sig = call_signature(pipe)
    conditions = _check_conditions(sig, conditions)
    if len(conditions) != len(seeds):
        raise ValueError(f"generate needs one seed per sample, got {len(conditions)} conditions and "
                         f"{len(seeds)} seeds.")
    kwargs: dict[str, Any] = {sig.conditioning: conditions, "generator": _generators(seeds)}
    if steps is not None:
        kwargs["num_inference_steps"] = int(steps)
    if guidance_scale is not None and sig.accepts("guidance_scale"):
        kwargs["guidance_scale"] = float(guidance_scale)
    if negative_prompt is not None:
        if not sig.accepts("negative_prompt"):
            raise ValueError(f"{sig.pipeline} takes no negative_prompt.")
        kwargs["negative_prompt"] = [negative_prompt] * len(conditions)
    for key, value in (("height", height), ("width", width), ("num_frames", num_frames)):
        if value is not None and sig.accepts(key):
            kwargs[key] = int(value)
    if sig.accepts("output_type"):
        kwargs["output_type"] = "pt"
    kwargs.update(_avoid_refusals(pipe, sig))
    unknown = [k for k in extra if not sig.accepts(k)]
    if unknown and not sig.takes_any_keyword:
        raise ValueError(f"{sig.pipeline} takes no {', '.join(unknown)}.")
    kwargs.update(extra)
    return kwargs


#: PixArt's aspect-ratio bins exist for these transformer sample sizes (latent sides); others raise.
_BINNED_SAMPLE_SIZES = (32, 64, 128, 256)


def _avoid_refusals(pipe: Any, sig: CallSignature) -> dict[str, Any]:
    """Defaults under which the pipeline would refuse or warn on every call, set to what it would fall back
    to: PixArt's resolution binning on a model whose sample size has no bins ("Invalid sample size"), and
    caption cleaning without the libraries it needs (diffusers warns, then skips it)."""
    kwargs: dict[str, Any] = {}
    sample_size = getattr(getattr(getattr(pipe, "transformer", None), "config", None), "sample_size", None)
    if sig.accepts("use_resolution_binning") and sample_size not in _BINNED_SAMPLE_SIZES:
        kwargs["use_resolution_binning"] = False
    if sig.accepts("clean_caption") and not all(importlib.util.find_spec(m) for m in ("bs4", "ftfy")):
        kwargs["clean_caption"] = False
    return kwargs


def folder_prompts(pipe: Any) -> list[str] | None:
    """The prompts a pipeline folder ships in ``prompts.txt`` beside ``model_index.json`` (one per line),
    if any: a model's own benchmark and calibration prompts (digits-pixart's name digits and attributes)."""
    folder = getattr(getattr(pipe, "config", None), "_name_or_path", None)
    return read_prompts(Path(folder)) if isinstance(folder, str) and folder else None


def read_prompts(folder: Path) -> list[str] | None:
    """The non-empty lines of ``folder/prompts.txt``, or None without that file (or with no prompts)."""
    path = folder / "prompts.txt"
    if not path.is_file():
        return None
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return prompts or None


def class_count(pipe: Any) -> int | None:
    """Number of classes of a class-conditional pipeline (ours: ``num_classes``; diffusers' DiT: the label
    embedding's size without the CFG null label, or ``id2label``)."""
    classes = getattr(pipe, "num_classes", None)
    if classes is None:
        config = getattr(getattr(pipe, "transformer", None), "config", None)
        classes = getattr(config, "num_embeds_ada_norm", None)
    if classes is None and getattr(pipe, "labels", None):
        classes = len(pipe.labels)
    return None if classes is None else int(classes)


def default_conditions(pipe: Any, count: int = 10) -> list[Condition]:
    """Calibration conditions when the caller gives none: the folder's prompts or the built-in ones for
    text pipelines, ``count`` class labels spread over the classes for class-conditional ones."""
    sig = call_signature(pipe)
    if sig.is_text:
        prompts = folder_prompts(pipe) or list(DEFAULT_PROMPTS)
        return prompts[: min(count, len(prompts))]
    classes = class_count(pipe) or 10
    count = min(count, classes)
    return [round(i * (classes - 1) / max(count - 1, 1)) for i in range(count)] if count > 1 else [0]


def default_calls(
    pipe: Any, seeds: Sequence[int], steps: int | None = None, conditions: Sequence[Condition] | None = None,
    **kw: Any,
) -> list[dict[str, Any]]:
    """One call per seed over ``conditions`` (default: :func:`default_conditions`), each sample with its
    own generator seeded ``seed * 1000 + i`` (other seeds than a benchmark's small ones)."""
    conditions = list(conditions) if conditions is not None else default_conditions(pipe)
    return [build_call(pipe, conditions, [int(seed) * 1000 + i for i in range(len(conditions))], steps, **kw)
            for seed in seeds]


def call_shape(kwargs: dict[str, Any]) -> dict[str, Any]:
    """What an artifact records of the call it was calibrated on: conditioning, batch, steps, guidance and
    sizes (so a user can see what a schedule or quantizer was fitted to)."""
    shape: dict[str, Any] = {}
    for key in ("prompt", "class_labels"):
        if key in kwargs:
            value = kwargs[key]
            shape["conditioning"] = key
            shape["batch"] = len(value) if isinstance(value, (list, tuple)) else 1
    for key in ("num_inference_steps", "guidance_scale", "height", "width", "num_frames"):
        value = kwargs.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            shape[key] = value
    return shape


def _pil_to_tensor(image: Any) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[..., None]
    return torch.from_numpy(array).permute(2, 0, 1)


def as_tensor_output(output: Any, video: bool) -> torch.Tensor:
    """A pipeline's ``images`` / ``frames`` as float32 CPU tensors: images (N, C, H, W), videos
    (N, F, C, H, W). Accepts torch ``pt`` outputs, numpy (channels last) and PIL lists."""
    if isinstance(output, (list, tuple)) and output and not torch.is_tensor(output[0]):
        if isinstance(output[0], (list, tuple)):  # videos as lists of PIL frames
            return torch.stack([torch.stack([_pil_to_tensor(f) for f in v]) for v in output])
        if isinstance(output[0], np.ndarray):
            output = np.stack(output)
        else:
            return torch.stack([_pil_to_tensor(im) for im in output])
    if isinstance(output, (list, tuple)):
        output = torch.stack(list(output))
    if isinstance(output, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(output)).float()
        if x.ndim == 4 and not video and x.shape[-1] in (1, 3, 4):  # (N, H, W, C)
            x = x.permute(0, 3, 1, 2)
        elif x.ndim == 5 and x.shape[-1] in (1, 3, 4):  # (N, F, H, W, C)
            x = x.permute(0, 1, 4, 2, 3)
    else:
        x = output.detach().float().cpu()
    if video and x.ndim == 4:  # (N, F, H, W) single-channel videos
        x = x.unsqueeze(2)
    if x.ndim != (5 if video else 4):
        raise ValueError(f"Expected {'videos' if video else 'images'} from the pipeline, "
                         f"got shape {tuple(x.shape)}.")
    return x.contiguous()


@torch.no_grad()
def run_call(pipe: Any, kwargs: dict[str, Any]) -> torch.Tensor:
    """Run one call built by :func:`build_call`; its images or videos as float32 CPU tensors in [0, 1]."""
    out = pipe(**kwargs)
    if hasattr(out, "frames"):
        return as_tensor_output(out.frames, video=True).clamp_(0, 1)
    if hasattr(out, "images"):
        return as_tensor_output(out.images, video=False).clamp_(0, 1)
    raise UnsupportedPipelineError(f"{type(pipe).__name__} returned {type(out).__name__} without `images` "
                                   "or `frames`.")
