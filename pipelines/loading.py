"""``load``: one entry for embedded models, local diffusers folders, hub ids and timm model names.

    pipe = load("digits-dit")                       # embedded, ships with accel
    pipe = load("/path/to/diffusers/folder")        # model_index.json picks the pipeline class
    pipe = load("PixArt-alpha/PixArt-XL-2-512x512") # hub id, when the hub is reachable
    vit = load("timm:vit_small_patch16_224", weights="/path/model.safetensors")
"""

from __future__ import annotations

import json
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from accel.pipelines.classifiers import WEIGHTS_FILE, load_judge, load_vit, load_weights
from accel.pipelines.digits_dit import DigitsDiTPipeline
from accel.pipelines.digits_video import DigitsVideoPipeline

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
#: Names of the models that ship with accel (``load(name)`` needs no network).
EMBEDDED = ("digits-pixart", "digits-dit", "digits-video-dit", "digits-vit", "digits-judge", "digits-pixart-judge")
#: Our pipeline classes by the ``_class_name`` that ``save_pretrained`` writes into model_index.json.
OWN_PIPELINES = {cls.__name__: cls for cls in (DigitsDiTPipeline, DigitsVideoPipeline)}
#: Artifacts made offline for an embedded model and shipped beside it (folders in ``WEIGHTS_DIR``), by
#: (model, method): HierarchicalPrune's removed blocks with distilled weights (``prune_bench``).
SHIPPED_ARTIFACTS = {("digits-pixart", "hierarchical-prune"): "digits-pixart-hp30"}
ACCEPTED = (f"an embedded name ({', '.join(EMBEDDED)}), a local diffusers folder with model_index.json, "
            "a classifier folder with config.json + model.safetensors, a hub id 'owner/name', "
            "or a timm model 'timm:<name>'")


def shipped_artifact(model: str, method: str) -> Path | None:
    """The folder of the artifact shipped for ``method`` on the embedded ``model``, or None."""
    folder = SHIPPED_ARTIFACTS.get((model, method))
    return None if folder is None or not (WEIGHTS_DIR / folder).is_dir() else WEIGHTS_DIR / folder


class HubUnreachableError(ConnectionError):
    """The hub could not be reached (offline machine, HF_HUB_OFFLINE set, or no network)."""


def load(name_or_path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         weights: str | os.PathLike | None = None) -> Any:
    """Loads a pipeline or classifier by embedded name, local folder, hub id or timm name.

    Args:
        name_or_path: see ``ACCEPTED``; an existing local path wins over a hub id of the same spelling.
        device: where the model is placed.
        dtype: parameter dtype (float32 when None; the embedded models are trained in float32).
        weights: optional local safetensors file for a ``timm:`` model (its own pretrained weights are never
            downloaded).

    Returns:
        A ``DiffusionPipeline`` for generative models, an ``nn.Module`` in eval mode for classifiers.
    """
    text = os.fspath(name_or_path)
    if text in EMBEDDED:
        return _load_folder(WEIGHTS_DIR / text, device, dtype)
    if text.startswith("timm:"):
        return _load_timm(text[len("timm:"):], device, dtype, weights)
    path = Path(text).expanduser()
    if path.exists():
        return _load_folder(path, device, dtype)
    if _looks_like_path(text):
        raise FileNotFoundError(f"No such model folder: {text!r}. Accepted: {ACCEPTED}.")
    if _is_timm_name(text):
        return _load_timm(text, device, dtype, weights)
    if _looks_like_hub_id(text):
        return _load_hub(text, device, dtype)
    raise ValueError(f"Unknown model {text!r}. Accepted: {ACCEPTED}.")


def _load_folder(path: Path, device: str | torch.device, dtype: torch.dtype | None) -> Any:
    """A diffusers pipeline folder (ours or any diffusers class) or one of our classifier folders."""
    index = path / "model_index.json"
    if index.is_file():
        cls = _pipeline_class(index)
        pipe = cls.from_pretrained(str(path), **_dtype_kwarg(dtype))
        pipe.set_progress_bar_config(disable=True)  # callers drive their own progress bars
        return pipe.to(device)
    config_path = path / "config.json"
    if config_path.is_file() and (path / WEIGHTS_FILE).is_file():
        arch = json.loads(config_path.read_text()).get("arch")
        loader = {"DigitJudge": load_judge, "timm": load_vit}.get(arch)
        if loader is None:
            raise ValueError(f"Classifier folder {str(path)!r} has arch {arch!r}; accepted: 'DigitJudge', 'timm'.")
        return loader(path, device).to(dtype or torch.float32)
    if not path.exists():
        raise FileNotFoundError(f"Model folder {str(path)!r} is missing; embedded weights ship under "
                                f"{WEIGHTS_DIR}. Reinstall accel or retrain with accel.pipelines.train.")
    raise ValueError(f"{str(path)!r} is not a model folder: it has neither model_index.json nor "
                     f"config.json + {WEIGHTS_FILE}. Accepted: {ACCEPTED}.")


def _pipeline_class(index: Path) -> type:
    """The class to load a pipeline folder with: ours by name, else diffusers' (which must know it)."""
    import diffusers

    from accel.artifacts import read_json

    remake = "Save the pipeline again with pipe.save_pretrained(folder)."
    class_name = read_json(index, "diffusers model index", remake).get("_class_name")
    if not isinstance(class_name, str) or not class_name:
        raise ValueError(f"{index} names no pipeline class (`_class_name`). {remake}")
    if class_name in OWN_PIPELINES:
        return OWN_PIPELINES[class_name]
    if not hasattr(diffusers, class_name):
        raise ValueError(f"{index} names the pipeline class {class_name!r}, which diffusers "
                         f"{diffusers.__version__} does not have: update diffusers, or fix `_class_name`.")
    return diffusers.DiffusionPipeline


def _dtype_kwarg(dtype: torch.dtype | None) -> dict[str, torch.dtype]:
    """``dtype=`` on diffusers that renamed ``torch_dtype`` (it warns on the old name), ``torch_dtype=`` before."""
    from diffusers.utils import deprecation_utils

    key = "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"
    return {key: dtype or torch.float32}


def _load_timm(name: str, device: str | torch.device, dtype: torch.dtype | None,
               weights: str | os.PathLike | None) -> torch.nn.Module:
    """A timm model built with ``pretrained=False``; weights only from a local safetensors file."""
    import timm

    if not timm.is_model(name):
        raise ValueError(f"Unknown timm model {name!r}. See timm.list_models(); e.g. 'timm:vit_small_patch16_224'.")
    model = timm.create_model(name, pretrained=False)
    if weights is not None:
        weights_path = Path(weights)
        if not weights_path.is_file() or weights_path.suffix != ".safetensors":
            raise FileNotFoundError(f"timm weights must be an existing .safetensors file, got {str(weights)!r}.")
        load_weights(model, weights_path)
    return model.to(device=device, dtype=dtype or torch.float32).eval()


def _load_hub(repo_id: str, device: str | torch.device, dtype: torch.dtype | None) -> Any:
    """``DiffusionPipeline.from_pretrained(repo_id)``, or a clear error when the hub is unreachable."""
    import diffusers

    online = hub_reachable()
    try:
        # Offline, a copy in the local cache still loads; nothing is fetched.
        pipe = diffusers.DiffusionPipeline.from_pretrained(repo_id, **_dtype_kwarg(dtype),
                                                           local_files_only=not online)
    except (OSError, ValueError) as err:
        if online:
            raise
        raise HubUnreachableError(
            f"Could not reach the model hub to load {repo_id!r} (no network, or HF_HUB_OFFLINE is set) and it "
            "is not in the local cache. Pass a local diffusers folder instead, or an embedded model: "
            f"{', '.join(EMBEDDED)}.") from err
    return pipe.to(device)


def hub_reachable(timeout: float = 1.5) -> bool:
    """Whether the hub endpoint answers a TCP connect within ``timeout`` seconds (False when HF_HUB_OFFLINE).

    Name resolution has no timeout of its own, so the whole probe runs in a worker thread: an offline
    machine gets its answer in ``timeout`` seconds instead of waiting on DNS or HTTP retries.
    """
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    if constants.HF_HUB_OFFLINE or env in ("1", "ON", "YES", "TRUE"):  # the env var may be set after import
        return False
    host = urlparse(constants.ENDPOINT).hostname
    port = urlparse(constants.ENDPOINT).port or 443
    if not host:
        return False

    def connect() -> bool:
        with socket.create_connection((host, port), timeout=timeout):
            return True

    pool = ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(connect).result(timeout=timeout)
    except (OSError, FutureTimeout):
        return False
    finally:
        pool.shutdown(wait=False)  # a DNS lookup still hanging must not block the caller


def _looks_like_path(text: str) -> bool:
    """Paths start with . / ~ or have more than one separator; a hub id is exactly 'owner/name'."""
    return text.startswith((".", "/", "~")) or text.count("/") > 1 or text.endswith((".json", ".safetensors"))


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts)


def _is_timm_name(text: str) -> bool:
    if "/" in text:
        return False
    import timm

    return timm.is_model(text)
