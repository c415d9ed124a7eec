"""accel: training-free acceleration for diffusion transformers and ViTs.

    import accel
    patch = accel.patch(pipe, "delta-dit")     # or config objects, composed in one call
    images = pipe(class_labels=[3]).images
    print(patch.report()); patch.remove()       # the model is exactly as before

Importing accel never imports triton or gradio and never touches CUDA.
"""

from __future__ import annotations

from accel import methods
from accel.adapters.base import BlockInfo, ModelAdapter, TokenLayout
from accel.api import Patch, PatchReport, active_patch, patch, unpatch
from accel.config import MethodConfig
from accel.contract import Handle, PatchContext
from accel.errors import (
    AccelError,
    AlreadyPatchedError,
    ArtifactMismatchError,
    IncompatibleMethodsError,
    UnknownMethodError,
    UnsupportedModelError,
)
from accel.methods.adaspa import AdaSpaConfig
from accel.methods.bac import BACConfig
from accel.methods.delta_dit import DeltaDiTConfig
from accel.methods.hierarchical_prune import HierarchicalPruneConfig
from accel.methods.quest import QuESTConfig
from accel.methods.vmoba import VMoBAConfig
from accel.registry import (
    Stage,
    find_adapter,
    method_names,
    register_adapter,
    register_method,
    supported_model_classes,
)
from accel.steps import StepState

__version__ = "0.1.0"

# Subpackages reachable as attributes (``accel.pipelines.load``) without importing them with ``accel``:
# the embedded models, the benchmark and the demo pull in more than patching needs.
_LAZY_SUBPACKAGES = ("attention", "benchmarks", "demos", "kernels", "metrics", "pipelines", "prune", "quant")


def __getattr__(name: str) -> object:
    if name in _LAZY_SUBPACKAGES:
        import importlib

        return importlib.import_module(f"accel.{name}")
    raise AttributeError(f"module 'accel' has no attribute {name!r}")

__all__ = [
    "AccelError", "QuESTConfig", "AdaSpaConfig", "VMoBAConfig", "BACConfig", "DeltaDiTConfig", "HierarchicalPruneConfig", "methods", "AlreadyPatchedError", "ArtifactMismatchError", "BlockInfo", "IncompatibleMethodsError",
    "Handle", "MethodConfig", "ModelAdapter", "Patch", "PatchContext", "PatchReport", "Stage", "StepState", "TokenLayout",
    "UnknownMethodError", "UnsupportedModelError", "active_patch", "find_adapter", "method_names", "patch",
    "register_adapter", "register_method", "supported_model_classes", "unpatch",
]
