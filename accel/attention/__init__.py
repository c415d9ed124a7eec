"""Block-sparse attention: the one block-index format, its backends, and the hook that replaces the
attention call inside a model's attention modules."""

from accel.attention.backends import BACKENDS, choose_backend, gather_attention, sparse_attention
from accel.attention.dispatcher import register_diffusers_backend
from accel.attention.format import BlockSparseMask
from accel.attention.intercept import SparseAttentionHook, override_installed
from accel.attention.tokens import SequenceGeometry, inverse_permutation, partition_permutation

__all__ = [
    "BACKENDS", "BlockSparseMask", "SequenceGeometry", "SparseAttentionHook", "choose_backend",
    "gather_attention", "inverse_permutation", "override_installed", "partition_permutation",
    "register_diffusers_backend",
    "sparse_attention",
]
