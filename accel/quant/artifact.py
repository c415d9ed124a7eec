"""A quantized model as a file: integer weights, scales and zero points in safetensors, everything
else (bits, layer specs, which layers were finetuned, calibration facts, the model it belongs to)
in JSON. Loading builds the same ``QuantLinear`` layers, so outputs are bit-identical.

    qm = accel.methods.quest.finetune(pipe, calib, config)
    qm.save("digits-dit-w4a8")                  # -> digits-dit-w4a8/quest.json + quest.safetensors
    accel.patch(pipe, accel.QuESTConfig(artifact="digits-dit-w4a8"))
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from accel.artifacts import architecture_fingerprint, model_fingerprint, read_artifact, write_artifact
from accel.errors import ArtifactMismatchError
from accel.quant.qlinear import LayerSpec, QuantLinear

FORMAT = "accel.quest"
VERSION = 2  # 2: the values digest is accel.artifacts.weights_digest (1: a QuEST-only digest)
JSON_NAME = "quest.json"
TENSORS_NAME = "quest.safetensors"


def fingerprint_for(model: torch.nn.Module, version: int = VERSION) -> str:
    """The model's fingerprint as an artifact of ``version`` recorded it: version 2 on is
    :func:`accel.artifacts.model_fingerprint`; version 1 digested the values its own way and is checked
    that way, so those files keep loading."""
    if version >= 2:
        return model_fingerprint(model)
    return f"{architecture_fingerprint(model)}:{_values_digest_v1(model)}"


def _values_digest_v1(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        if flat.numel() > 65536:
            flat = flat[:: flat.numel() // 65536 + 1]
        digest.update(name.encode())
        digest.update(flat.float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class QuantizedModel:
    """Quantized linear layers for one model, plus what produced them."""

    fingerprint: str
    config: dict[str, Any]
    layers: dict[str, QuantLinear]
    meta: dict[str, Any] = field(default_factory=dict)
    version: int = VERSION  # of the file it was read from: says how its fingerprint was computed

    def check_model(self, model: torch.nn.Module) -> None:
        found = fingerprint_for(model, self.version)
        if found != self.fingerprint:
            arch_saved, arch_found = self.fingerprint.rsplit(":", 1)[0], found.rsplit(":", 1)[0]
            what = "weights" if arch_saved == arch_found else "architecture"
            raise ArtifactMismatchError(
                f"This QuEST artifact belongs to model {self.fingerprint}, not {found} (the {what} differ). "
                "Quantize this model: calib = accel.methods.quest.calibrate(pipe, config); "
                "accel.methods.quest.finetune(pipe, calib, config).save(path)."
            )

    def nbytes(self, exclude: set[str] | None = None) -> int:
        """Bytes of the quantized layers (packed weights, scales, zero points, biases), but ``exclude``."""
        return sum(b.numel() * b.element_size() for name, layer in self.layers.items()
                   if name not in (exclude or ()) for b in layer.buffers())

    def save(self, path: str | Path) -> Path:
        """Write ``path/quest.json`` and ``path/quest.safetensors``; returns the folder."""
        from safetensors.torch import save_file

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"{name}.{key}": buf.contiguous()
            for name, layer in self.layers.items()
            for key, buf in layer.state_dict().items()
            if key != "dtype_anchor"
        }
        save_file(tensors, str(folder / TENSORS_NAME))
        payload = {
            "model": self.fingerprint,
            "config": self.config,
            "layers": {
                name: {**layer.spec.to_json(), "kernel": layer.kernel} for name, layer in self.layers.items()
            },
            "meta": self.meta,
        }
        write_artifact(folder / JSON_NAME, FORMAT, self.version, payload)
        return folder

    @classmethod
    def load(cls, path: str | Path) -> QuantizedModel:
        """Read an artifact written by :meth:`save` (safetensors and JSON only; nothing is unpickled)."""
        from safetensors.torch import load_file

        folder = Path(path)
        if not (folder / JSON_NAME).is_file() or not (folder / TENSORS_NAME).is_file():
            raise FileNotFoundError(
                f"No QuEST artifact at {str(folder)!r}: expected {JSON_NAME} and "
                f"{TENSORS_NAME} there. Write one with QuantizedModel.save(path)."
            )
        data, version = read_artifact(folder / JSON_NAME, FORMAT, VERSION, "QuEST artifact",
                                      "Write one with QuantizedModel.save(path).")
        by_layer: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in load_file(str(folder / TENSORS_NAME)).items():
            name, _, buffer = key.rpartition(".")
            by_layer.setdefault(name, {})[buffer] = tensor
        layers = {}
        for name, info in data["layers"].items():
            kernel = info.pop("kernel", "fake")
            layer = QuantLinear(LayerSpec(**info))
            for key, value in by_layer.get(name, {}).items():
                setattr(layer, key, value)
            layer.kernel = kernel
            layers[name] = layer
        return cls(data["model"], data["config"], layers, data.get("meta", {}), version)
