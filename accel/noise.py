"""What a diffusers scheduler says about the denoiser's input and output: the one place that reads them.

Every sampler accel knows feeds the denoiser a noisy sample x_t = α_t·x0 + σ_t·ε and reads back one of
four parameterisations of the same estimate (the scheduler's ``prediction_type``, or flow matching's
velocity). From (α_t, σ_t) and the parameterisation, a model output converts to the clean-sample
estimate x̂0 and back at another step:

- ``epsilon``: out = ε;                 x̂0 = (x − σ·out) / α
- ``v_prediction``: out = α·ε − σ·x0;  x̂0 = α·x − σ·out        (α² + σ² = 1)
- ``sample``: out = x0
- flow matching: out = ε − x0;          x̂0 = x − σ·out          (α = 1 − σ)

(α, σ) come from the scheduler's ``sigmas`` where it has them (the k-diffusion ratio σ/α for VP samplers,
whose model input is scaled back to x_t by ``scale_model_input`` or never left it; σ itself for flow
matching), else from ``alphas_cumprod`` at the timestep (DDPM, DDIM, PNDM).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


class Prediction(str, enum.Enum):
    """What the denoiser's output estimates."""

    EPSILON = "epsilon"
    V = "v_prediction"
    SAMPLE = "sample"
    FLOW = "flow"  # velocity ε − x0 of flow matching


@dataclass(frozen=True)
class NoisyInput:
    """x_t = alpha·x0 + sigma·ε at one step."""

    alpha: float
    sigma: float

    @property
    def snr_sqrt(self) -> float:
        return self.alpha / max(self.sigma, 1e-12)


def is_flow_matching(scheduler: Any) -> bool:
    config = getattr(scheduler, "config", {})
    return "FlowMatch" in type(scheduler).__name__ or bool(_config_get(config, "use_flow_sigmas")) or (
        _config_get(config, "prediction_type") == "flow_prediction")


def prediction_of(scheduler: Any) -> Prediction | None:
    """The parameterisation the scheduler reads the denoiser's output in; ``None`` when it does not say, or
    when it preconditions inputs and outputs (EDM's c_in, c_skip, c_out), which none of the four describe."""
    if "EDM" in type(scheduler).__name__:
        return None
    if is_flow_matching(scheduler):
        return Prediction.FLOW
    kind = _config_get(getattr(scheduler, "config", {}), "prediction_type")
    return {p.value: p for p in Prediction}.get(kind) if isinstance(kind, str) else None


def _from_sigma(sigma: float, flow: bool) -> NoisyInput:
    s = max(float(sigma), 1e-6)
    if flow:
        return NoisyInput(alpha=1.0 - min(s, 1.0), sigma=s)
    alpha = 1.0 / math.sqrt(1.0 + s * s)
    return NoisyInput(alpha=alpha, sigma=s * alpha)


def _from_alpha_bar(alpha_bar: float) -> NoisyInput:
    a = min(max(float(alpha_bar), 0.0), 1.0)
    return NoisyInput(alpha=math.sqrt(a), sigma=math.sqrt(max(1.0 - a, 1e-12)))


def step_inputs(scheduler: Any, num_steps: int) -> list[NoisyInput] | None:
    """(α, σ) of each of the ``num_steps`` steps the scheduler holds; ``None`` when it holds another count
    or no noise levels accel can read."""
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None or len(timesteps) != num_steps:
        return None
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and len(sigmas) >= num_steps:
        flow = is_flow_matching(scheduler)
        values = torch.as_tensor(sigmas[:num_steps], dtype=torch.float64).tolist()
        return [_from_sigma(s, flow) for s in values]
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is not None:
        a = torch.as_tensor(alphas, dtype=torch.float64)[torch.as_tensor(timesteps).long().cpu()]
        return [_from_alpha_bar(v) for v in a.tolist()]
    return None


def noise_levels(scheduler: Any, num_steps: int) -> list[float] | None:
    """Each step's noise level as its timestep over the scheduler's training range (1 = pure noise; a
    flow-matching scheduler's σ): the coordinate in which ``bac_schedule.NoiseLevelDistances`` are kept. ``None``
    when the scheduler holds no timesteps for ``num_steps`` steps."""
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None or len(timesteps) != num_steps:
        return None
    span = _config_get(getattr(scheduler, "config", {}), "num_train_timesteps") or 1000
    return (torch.as_tensor(timesteps, dtype=torch.float64).cpu() / float(span)).tolist()


def current_input(scheduler: Any, step_index: int, timestep: float | None) -> NoisyInput | None:
    """(α, σ) of the forward at loop step ``step_index`` with ``timestep``: by the scheduler's own step
    index where it keeps one (img2img loops start part-way, ``set_begin_index``), else by the timestep in
    ``alphas_cumprod``; ``None`` when neither can be read."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None:
        index = getattr(scheduler, "step_index", None)
        if index is None:
            begin = getattr(scheduler, "begin_index", None)
            index = step_index + (begin or 0)
        if 0 <= index < len(sigmas):
            return _from_sigma(float(sigmas[index]), is_flow_matching(scheduler))
        return None
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is not None and timestep is not None and 0 <= round(timestep) < len(alphas):
        return _from_alpha_bar(float(alphas[round(timestep)]))
    return None


def to_clean(prediction: Prediction, out: torch.Tensor, sample: torch.Tensor, at: NoisyInput) -> torch.Tensor:
    """The clean-sample estimate x̂0 that output ``out`` for input ``sample`` stands for (float32)."""
    out, x = out.float(), sample.float()
    if prediction is Prediction.EPSILON:
        return (x - at.sigma * out) / at.alpha
    if prediction is Prediction.V:
        return at.alpha * x - at.sigma * out
    if prediction is Prediction.FLOW:
        return x - at.sigma * out
    return out


def from_clean(prediction: Prediction, clean: torch.Tensor, sample: torch.Tensor,
               at: NoisyInput) -> torch.Tensor:
    """The output that says x̂0 = ``clean`` for input ``sample`` (the inverse of :func:`to_clean`)."""
    x = sample.float()
    if prediction is Prediction.EPSILON:
        return (x - at.alpha * clean) / at.sigma
    if prediction is Prediction.V:
        return (at.alpha * x - clean) / at.sigma
    if prediction is Prediction.FLOW:
        return (x - clean) / at.sigma
    return clean


def prediction_split(out_shape: Sequence[int], sample_shape: Sequence[int]) -> int | None:
    """Where the output's prediction ends: ``None`` when the output has the input's shape, else the
    dimension along which it holds twice the input's channels (the prediction first, then learned
    variance: DiT, PixArt). Raises ``ValueError`` for any other shape."""
    if tuple(out_shape) == tuple(sample_shape):
        return None
    if len(out_shape) == len(sample_shape):
        differ = [d for d, (o, s) in enumerate(zip(out_shape, sample_shape)) if o != s]
        if len(differ) == 1 and out_shape[differ[0]] == 2 * sample_shape[differ[0]]:
            return differ[0]
    raise ValueError(
        f"the denoiser's output {tuple(out_shape)} is neither its input's shape {tuple(sample_shape)} nor "
        "twice its channels (prediction + learned variance), so it cannot be read as an estimate of the "
        "input's clean sample (a model that takes extra condition channels, e.g. inpainting)."
    )


def _config_get(config: Any, key: str) -> Any:
    return config.get(key) if hasattr(config, "get") else getattr(config, key, None)
