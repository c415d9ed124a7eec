"""HierarchicalPrune's parts: block structure, sensitivity analysis, block selection, distillation, artifacts.

The method itself (config, ``prune``, the ``accel.patch`` entry) is ``accel.methods.hierarchical_prune``.
"""

from accel.prune.artifact import PruneArtifact
from accel.prune.distill import InputPool, record_inputs
from accel.prune.select import select_blocks
from accel.prune.sensitivity import SensitivityProfile, analyze_blocks

__all__ = ["InputPool", "PruneArtifact", "SensitivityProfile", "analyze_blocks", "record_inputs", "select_blocks"]
