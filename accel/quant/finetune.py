"""QuEST's selective finetuning: find the layers worth training, then distill the quantized model
into the full-precision one over timesteps, training only those layers and the quantizer step sizes.

Two kinds of layers are selected (Wang et al., "QuEST: Low-bit Diffusion Model Quantization via
Efficient Selective Finetuning"):
- temporal layers: those that carry the timestep (time embedding, adaLN modulation). They are found
  structurally: in a denoiser, a linear layer fed (B, C) conditioning vectors instead of (B, N, C)
  tokens sits on the conditioning path;
- activation-sensitive layers: measured, not named — each layer is quantized alone (the rest full
  precision) and the relative error of the model output is recorded; the worst ``k`` are taken.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from accel.modules import output_tensor, parent_of
from accel.quant.qlinear import LSQLinear

Call = tuple[tuple[Any, ...], dict[str, Any]]


@contextlib.contextmanager
def swapped(model: torch.nn.Module, modules: dict[str, torch.nn.Module]) -> Iterator[None]:
    """Put ``modules`` in place of the model's sub-modules of the same names; restore on exit."""
    originals = {}
    try:
        for name, module in modules.items():
            parent, child = parent_of(model, name)
            originals[name] = parent._modules[child]
            setattr(parent, child, module)
        yield
    finally:
        for name, module in originals.items():
            parent, child = parent_of(model, name)
            setattr(parent, child, module)


def relative_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``||out - target||^2 / ||target||^2`` (scale-free, comparable across layers and timesteps)."""
    return (out.float() - target.float()).pow(2).sum() / target.float().pow(2).sum().clamp_min(1e-12)


@torch.no_grad()
def teacher_outputs(model: torch.nn.Module, inputs: Sequence[Call]) -> list[torch.Tensor]:
    """Full-precision outputs for the kept calibration calls (the distillation targets)."""
    return [output_tensor(model(*args, **kwargs)).detach() for args, kwargs in inputs]


def temporal_layers(token_input: dict[str, bool], is_denoiser: bool) -> list[str]:
    """Layers on a denoiser's conditioning path: they only ever saw (B, C) inputs."""
    return [name for name, tokens in token_input.items() if is_denoiser and not tokens]


@torch.no_grad()
def sensitivity(
    model: torch.nn.Module,
    lsq: dict[str, LSQLinear],
    inputs: Sequence[Call],
    targets: Sequence[torch.Tensor],
    progress: bool = True,
) -> dict[str, float]:
    """Relative output error with only one layer quantized (weights and activations), per layer."""
    for layer in lsq.values():
        layer.quantize_weights = layer.quantize_acts = False
    scores = {}
    try:
        with swapped(model, lsq):
            for name, layer in tqdm(lsq.items(), desc="QuEST sensitivity", disable=not progress):
                layer.quantize_weights = layer.quantize_acts = True
                errors = [
                    relative_error(output_tensor(model(*a, **k)), t) for (a, k), t in zip(inputs, targets)
                ]
                scores[name] = float(torch.stack(errors).mean())
                layer.quantize_weights = layer.quantize_acts = False
    finally:
        for layer in lsq.values():
            layer.quantize_weights = layer.quantize_acts = True
    return scores


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, lsq: dict[str, LSQLinear], inputs: Sequence[Call], targets: Sequence[torch.Tensor]
) -> float:
    """Mean relative output error of the model with every ``lsq`` layer in place."""
    with swapped(model, lsq):
        errors = [relative_error(output_tensor(model(*a, **k)), t) for (a, k), t in zip(inputs, targets)]
    return float(torch.stack(errors).mean())


def pick_sensitive(scores: dict[str, float], count: int, exclude: Sequence[str] = ()) -> list[str]:
    """The ``count`` layers with the largest error, skipping ``exclude`` (already selected)."""
    ranked = sorted((n for n in scores if n not in set(exclude)), key=lambda n: scores[n], reverse=True)
    return ranked[:count]


def distill(
    model: torch.nn.Module,
    lsq: dict[str, LSQLinear],
    trainable: Sequence[str],
    inputs: Sequence[Call],
    targets: Sequence[torch.Tensor],
    *,
    iters: int,
    lr: float = 1e-5,
    step_lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the weights and biases of ``trainable`` layers and every quantizer step size so the
    quantized model's output matches the full-precision one on the kept calls (all timesteps).

    Everything else is frozen. Cosine learning-rate decay; Ctrl-C stops early and keeps the progress.
    """
    if iters <= 0 or not inputs:
        return {"iters": 0, "seconds": 0.0, "loss_first": None, "loss_last": None}
    weights = [p for name in trainable for p in (lsq[name].weight, lsq[name].bias) if p is not None]
    steps = [p for layer in lsq.values() for p in layer.step_parameters()]
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in lsq.values():
        layer.weight.requires_grad_(False)
        if layer.bias is not None:
            layer.bias.requires_grad_(False)
    for p in weights + steps:
        p.requires_grad_(True)
    groups = [{"params": weights, "lr": lr}] if weights else []
    optimizer = torch.optim.Adam(groups + [{"params": steps, "lr": step_lr}])
    base = [g["lr"] for g in optimizer.param_groups]
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    start = time.perf_counter()
    done = 0
    try:
        with swapped(model, lsq), torch.enable_grad():
            bar = tqdm(range(iters), desc="QuEST finetune", disable=not progress)
            for it in bar:
                for group, lr0 in zip(optimizer.param_groups, base):
                    group["lr"] = lr0 * 0.5 * (1 + math.cos(math.pi * it / iters))
                i = int(torch.randint(len(inputs), (1,), generator=gen))
                args, kwargs = inputs[i]
                loss = relative_error(output_tensor(model(*args, **kwargs)), targets[i])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                done = it + 1
                if it % 20 == 0:
                    bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4g}")
    except KeyboardInterrupt:  # keep what was learned so far; the caller freezes it
        pass
    finally:
        for p in weights + steps:
            p.requires_grad_(False)
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
    head = losses[: max(1, min(20, len(losses)))]
    tail = losses[-max(1, min(20, len(losses))) :]
    return {
        "iters": done,
        "seconds": round(time.perf_counter() - start, 2),
        "loss_first": sum(head) / len(head),
        "loss_last": sum(tail) / len(tail),
    }
