"""Triton kernels with PyTorch references beside them (installed as ``accel.kernels``).

The references import no triton; the launchers import it on first use, so ``import accel.kernels`` stays
lean. The launchers are ``accel.kernels.block_sparse_attention.block_sparse_attention`` and
``accel.kernels.block_sums.block_sums``, also exported here as ``triton_block_sparse_attention`` and
``triton_block_sums`` (the package attributes named like the modules are the modules).
"""

from __future__ import annotations

from typing import Any

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
