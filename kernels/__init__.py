"""Triton kernels with PyTorch references beside them (installed as ``accel.kernels``).

The references import no triton; the launchers import it on first use, so ``import accel.kernels`` stays
lean. The launchers are ``accel.kernels.block_sparse_attention.block_sparse_attention`` and
``accel.kernels.block_sums.block_sums``, also exported here as ``triton_block_sparse_attention`` and
``triton_block_sums`` (the package attributes named like the modules are the modules).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from typing import Any


def _hand_over_to_installed_kernels() -> bool:
    """Put the installed ``kernels`` distribution in ``sys.modules`` in this module's place, if there is one.

    This folder is imported as top-level ``kernels`` whenever the repository root is on ``sys.path`` (a
    ``python -m ...`` run from it). That name belongs to Hugging Face's ``kernels`` distribution, which
    transformers imports once it is installed; the import system returns whatever ``sys.modules`` holds
    when this file finishes, so the importer gets the real one.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    elsewhere = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", elsewhere)
    if spec is None or spec.loader is None:
        return False
    installed = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = installed
    spec.loader.exec_module(installed)
    return True


if not (__name__ == "kernels" and _hand_over_to_installed_kernels()):
    from accel.kernels.reference import (
        block_sparse_attention_reference,
        block_sums_reference,
        check_block_sparse_inputs,
    )

__all__ = [
    "block_sparse_attention_reference", "block_sums_reference", "check_block_sparse_inputs",
    "triton_block_sparse_attention", "triton_block_sums",
]


def __getattr__(name: str) -> Any:
    if name == "triton_block_sparse_attention":
        from accel.kernels.block_sparse_attention import block_sparse_attention

        return block_sparse_attention
    if name == "triton_block_sums":
        from accel.kernels.block_sums import block_sums

        return block_sums
    raise AttributeError(f"module 'accel.kernels' has no attribute {name!r}")
