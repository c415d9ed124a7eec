"""QuEST's option sets (str enums, checked at config construction)."""

from __future__ import annotations

import enum


class Bits(str, enum.Enum):
    """Weight and activation bits. ``w4a16``: 4-bit weights only, activations not quantized (16-bit)."""

    W8A8 = "w8a8"
    W4A8 = "w4a8"
    W4A4 = "w4a4"
    W4A16 = "w4a16"

    @property
    def weight(self) -> int:
        return int(self.value[1])

    @property
    def act(self) -> int:
        return int(self.value[3:])

    @property
    def weight_only(self) -> bool:
        return self.act >= 16


class WeightGranularity(str, enum.Enum):
    PER_CHANNEL = "per_channel"
    PER_TENSOR = "per_tensor"


class ActGranularity(str, enum.Enum):
    """``per_tensor``: one static range per layer, calibrated over timesteps. ``per_token``: a
    dynamic range per token computed at run time (no calibration needed, a little slower)."""

    PER_TENSOR = "per_tensor"
    PER_TOKEN = "per_token"


class RangeMethod(str, enum.Enum):
    MINMAX = "minmax"
    PERCENTILE = "percentile"
    MSE = "mse"


class Kernel(str, enum.Enum):
    AUTO = "auto"
    FUSED = "fused"
    INT_MM = "int_mm"
    ONEDNN = "onednn"
    FAKE = "fake"
