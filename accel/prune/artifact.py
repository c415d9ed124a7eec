"""The HierarchicalPrune artifact: which blocks were removed + the distilled weights, tied to one model.

A folder with ``hierarchical_prune.json`` (removed block indices and names, the source model's fingerprint
and weight digest, the settings, the sensitivity profile, the distillation record) and
``hierarchical_prune.safetensors`` (the finetuned tensors, under their names in the *unpruned* model, so
the artifact reads against the source it belongs to). Loads back bit-identically; a mismatched model is
refused with a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from accel.artifacts import architecture_fingerprint, read_artifact, weights_digest, write_artifact
from accel.errors import ArtifactMismatchError

ARTIFACT_FORMAT = "accel.hierarchical-prune"
ARTIFACT_VERSION = 1
JSON_NAME = "hierarchical_prune.json"
WEIGHTS_NAME = "hierarchical_prune.safetensors"


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
        found = architecture_fingerprint(model)
        if found != self.source:
            raise ArtifactMismatchError(
                f"This hierarchical-prune artifact belongs to model {self.source}, not {found} ({len(self.blocks)} "
                "blocks expected). Make one for this model with accel.methods.hierarchical_prune.prune(...).")
        digest = weights_digest(model, rounded=True)
        # artifacts written before digests were rounded to bf16 hold the exact fp32 digest
        if self.source_weights != digest and self.source_weights != weights_digest(model):
            raise ArtifactMismatchError(
                f"This hierarchical-prune artifact was distilled from other weights of {self.source} (digest "
                f"{self.source_weights}, this model {digest}); its finetuned blocks would not fit. Re-run "
                "accel.methods.hierarchical_prune.prune(...) on this checkpoint.")

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"source": self.source,
                "source_weights": self.source_weights, "blocks": self.blocks, "removed": self.removed,
                "removed_names": [self.blocks[i] for i in self.removed], "settings": self.settings,
                "profile": self.profile, "distill": self.distill, "weights": sorted(self.weights)}
        write_artifact(folder / JSON_NAME, ARTIFACT_FORMAT, ARTIFACT_VERSION, meta)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.weights.items()}
        save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": ARTIFACT_FORMAT})
        return folder

    @classmethod
    def load(cls, path: str | Path, *, weights: bool = True) -> PruneArtifact:
        """Load from the artifact folder (or its JSON file); ``weights=False`` reads its description only
        (settings, removed blocks), leaving ``weights`` empty."""
        path = Path(path)
        folder = path.parent if path.suffix == ".json" else path
        meta_path = folder / JSON_NAME
        if not meta_path.is_file():
            raise FileNotFoundError(f"No hierarchical-prune artifact at {str(path)!r} (expected {JSON_NAME} and "
                                    f"{WEIGHTS_NAME} in a folder); make one with prune(..., save_to=folder).")
        meta, _ = read_artifact(meta_path, ARTIFACT_FORMAT, ARTIFACT_VERSION, "hierarchical-prune artifact",
                                "Make one with prune(..., save_to=folder).")
        weights_path = folder / WEIGHTS_NAME
        tensors = load_file(str(weights_path)) if weights and weights_path.is_file() else {}
        return cls(source=meta["source"], source_weights=meta["source_weights"], blocks=list(meta["blocks"]),
                   removed=[int(i) for i in meta["removed"]], settings=dict(meta.get("settings", {})),
                   weights=tensors, profile=meta.get("profile"), distill=meta.get("distill"))
