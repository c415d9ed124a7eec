"""accel's saved files (BAC schedules, QuEST and HierarchicalPrune artifacts, sensitivity profiles): one
envelope ``{"_type", "_version", "_data"}``, one reader whose errors name the file and say how to remake
it, and the fingerprints that tie a file to the model it was made from."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from accel.errors import ArtifactMismatchError


def read_json(path: str | Path, what: str, remake: str) -> dict[str, Any]:
    """The JSON object in ``path``. A file that is not JSON, or not an object, raises
    :class:`ArtifactMismatchError` naming the file, ``what`` it should be and how to ``remake`` it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ArtifactMismatchError(f"{path} is not a {what}: it is not UTF-8 text. {remake}") from None
    except json.JSONDecodeError as exc:
        raise ArtifactMismatchError(
            f"{path} is not a {what}: invalid JSON ({exc.msg}: line {exc.lineno}, column {exc.colno}). "
            f"{remake}"
        ) from None
    if not isinstance(data, dict):
        raise ArtifactMismatchError(f"{path} is not a {what}: it holds a JSON {type(data).__name__}, not an "
                                    f"object. {remake}")
    return data


# ---- one envelope for every saved file -------------------------------------------------------------------

def envelope(kind: str, version: int, data: dict[str, Any]) -> dict[str, Any]:
    """``{"_type": kind, "_version": version, "_accel": ..., "_created": ..., "_data": data}``: how every
    accel file starts, so a reader knows what a file is, its format version, which accel wrote it and
    when, before reading any of its fields."""
    import datetime

    from accel import __version__

    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {"_type": kind, "_version": int(version), "_accel": __version__, "_created": created, "_data": data}


def write_artifact(path: str | Path, kind: str, version: int, data: dict[str, Any]) -> Path:
    """Write ``data`` in its envelope as JSON to ``path``."""
    path = Path(path)
    path.write_text(json.dumps(envelope(kind, version, data), indent=1, sort_keys=True), encoding="utf-8")
    return path


def unwrap(data: dict[str, Any], kind: str, version: int, where: str, what: str) -> tuple[dict[str, Any], int]:
    """The payload of an envelope of ``kind`` and the version that wrote it. Files from before the envelope
    (flat, with ``format`` and ``version`` fields) are read as they are, so nothing saved earlier is lost.
    A file of another kind or from a newer accel raises :class:`ArtifactMismatchError`."""
    if "_type" in data:
        found, written, payload = data.get("_type"), data.get("_version", 0), data.get("_data")
    else:
        found, written, payload = data.get("format"), data.get("version", 0), data
    if found != kind:
        raise ArtifactMismatchError(f"{where} is not a {what} (its type is {found!r}, a {what} is {kind!r}).")
    if not isinstance(written, int) or written > version:
        raise ArtifactMismatchError(f"{where} was written by a newer accel (file version {written!r}; this accel "
                                    f"reads up to {version}): upgrade accel to load it.")
    if not isinstance(payload, dict):
        raise ArtifactMismatchError(f"{where} is not a {what}: its data is not a JSON object.")
    return payload, written


def read_artifact(path: str | Path, kind: str, version: int, what: str, remake: str
                  ) -> tuple[dict[str, Any], int]:
    """:func:`read_json` then :func:`unwrap`: the payload and the version that wrote it."""
    return unwrap(read_json(path, what, remake), kind, version, str(path), what)


# ---- which model a saved file belongs to -----------------------------------------------------------------

def architecture_fingerprint(model: torch.nn.Module) -> str:
    """``Class:hash`` of the class, config and parameter shapes (not values): what a BAC schedule or a
    sensitivity profile depends on; refusing a re-saved identical checkpoint would only annoy."""
    config = getattr(model, "config", None)
    config_items = sorted((k, repr(v)) for k, v in dict(config).items() if not k.startswith("_")) if config else []
    shapes = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    payload = repr((type(model).__name__, config_items, shapes)).encode()
    return f"{type(model).__name__}:{hashlib.sha256(payload).hexdigest()[:16]}"


def weights_digest(model: torch.nn.Module, sample: int = 2048, rounded: bool = False) -> str:
    """A cheap digest of the values: each state tensor's name, shape and a fixed strided sample. Artifacts
    that replace or finetune part of a model (QuEST layers, distilled blocks) fit only the weights they
    were made from, so they check this too.

    ``rounded``: digest the sample rounded to bf16, so a checkpoint loaded in fp32 and the same checkpoint
    cast to bf16 (``torch_dtype=torch.bfloat16``) give one digest: an artifact made on either fits both."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // sample)
        h.update(name.encode())
        h.update(repr(tuple(tensor.shape)).encode())
        values = flat[::step][:sample]
        if rounded and values.is_floating_point():
            values = values.to(torch.bfloat16).view(torch.int16)
        else:
            values = values.float()
        h.update(values.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def model_fingerprint(model: torch.nn.Module) -> str:
    """``architecture:values``: what an artifact that keeps the rest of the model's weights (QuEST's
    layers) must match, so a retrained checkpoint of the same architecture is refused."""
    return f"{architecture_fingerprint(model)}:{weights_digest(model)}"
