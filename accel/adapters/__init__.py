"""Model-family adapters, looked up by model class along the MRO (see accel.registry.find_adapter)."""

from accel.adapters.base import BlockInfo, BlockIO, ModelAdapter, Stream, TokenLayout
from accel.adapters import dit  # noqa: F401  (registers)

__all__ = ["BlockIO", "BlockInfo", "ModelAdapter", "Stream", "TokenLayout"]
