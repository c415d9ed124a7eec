"""The HierarchicalPrune artifact: which blocks were removed + the distilled weights, tied to one model.

A folder with ``hierarchical_prune.json`` (removed block indices and names, the source model's fingerprint
and weight digest, the settings, the sensitivity profile, the distillation record) and
``hierarchical_prune.safetensors`` (the finetuned tensors, under their names in the *unpruned* model, so
the artifact reads against the source it belongs to). Loads back bit-identically; a mismatched model is
refused with a clear error.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from accel.artifacts import read_json
from accel.errors import ArtifactMismatchError
from accel.methods.bac_schedule import model_fingerprint

ARTIFACT_FORMAT = "accel.hierarchical-prune"
ARTIFACT_VERSION = 1
JSON_NAME = "hierarchical_prune.json"
WEIGHTS_NAME = "hierarchical_prune.safetensors"


def weights_digest(model: torch.nn.Module, sample: int = 2048) -> str:
    """A cheap digest of the parameter values: each tensor's shape and a fixed strided sample of its values.

    Distilled weights only make sense on top of the exact frozen weights they were trained with, so the
    artifact checks values too, not only the architecture (which ``model_fingerprint`` covers).
    """
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // sample)
        h.update(name.encode())
        h.update(repr(tuple(tensor.shape)).encode())
        h.update(flat[::step][:sample].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class PruneArtifact:
    """What ``prune`` decided and learned for one source model."""

    source: str
    source_weights: str
    blocks: list[str]
    removed: list[int]
    settings: dict[str, Any]
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    profile: dict[str, Any] | None = None
    distill: dict[str, Any] | None = None

    @property
    def kept(self) -> list[int]:
        gone = set(self.removed)
        return [i for i in range(len(self.blocks)) if i not in gone]

    def check_model(self, model: torch.nn.Module) -> None:
        """Refuse a model other than the one this artifact was made from."""
        found = model_fingerprint(model)
        if found != self.source:
            raise ArtifactMismatchError(
                f"This hierarchical-prune artifact belongs to model {self.source}, not {found} ({len(self.blocks)} "
                "blocks expected). Make one for this model with accel.methods.hierarchical_prune.prune(...).")
        digest = weights_digest(model)
        if digest != self.source_weights:
            raise ArtifactMismatchError(
                f"This hierarchical-prune artifact was distilled from other weights of {self.source} (digest "
                f"{self.source_weights}, this model {digest}); its finetuned blocks would not fit. Re-run "
                "accel.methods.hierarchical_prune.prune(...) on this checkpoint.")

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"format": ARTIFACT_FORMAT, "version": ARTIFACT_VERSION, "source": self.source,
                "source_weights": self.source_weights, "blocks": self.blocks, "removed": self.removed,
                "removed_names": [self.blocks[i] for i in self.removed], "settings": self.settings,
                "profile": self.profile, "distill": self.distill, "weights": sorted(self.weights)}
        (folder / JSON_NAME).write_text(json.dumps(meta, indent=1))
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.weights.items()}
        save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": ARTIFACT_FORMAT})
        return folder

    @classmethod
    def load(cls, path: str | Path) -> PruneArtifact:
        """Load from the artifact folder (or its JSON file)."""
        path = Path(path)
        folder = path.parent if path.suffix == ".json" else path
        meta_path = folder / JSON_NAME
        if not meta_path.is_file():
            raise FileNotFoundError(f"No hierarchical-prune artifact at {str(path)!r} (expected {JSON_NAME} and "
                                    f"{WEIGHTS_NAME} in a folder); make one with prune(..., save_to=folder).")
        meta = read_json(meta_path, "hierarchical-prune artifact",
                         "Make one with prune(..., save_to=folder).")
        if meta.get("format") != ARTIFACT_FORMAT:
            raise ArtifactMismatchError(f"{meta_path} is not a hierarchical-prune artifact "
                                        f"(format {meta.get('format')!r}).")
        if int(meta.get("version", 0)) > ARTIFACT_VERSION:
            raise ArtifactMismatchError(f"{meta_path} was written by a newer accel (version {meta['version']}); "
                                        "upgrade accel to load it.")
        weights_path = folder / WEIGHTS_NAME
        weights = load_file(str(weights_path)) if weights_path.is_file() else {}
        return cls(source=meta["source"], source_weights=meta["source_weights"], blocks=list(meta["blocks"]),
                   removed=[int(i) for i in meta["removed"]], settings=dict(meta.get("settings", {})),
                   weights=weights, profile=meta.get("profile"), distill=meta.get("distill"))
