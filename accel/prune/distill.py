"""Recovery after pruning: Positional Weight Preservation + Sensitivity-Guided Distillation.

Paper: "HierarchicalPrune: Position-Aware Compression for Large-Scale Diffusion Models" (SamsungLabs).

- **Positional Weight Preservation**: the protected early blocks (``protect_first``, never removed) and
  everything before the blocks (embeddings, timestep/class conditioning) stay frozen; the kept blocks after
  them and the output layers are trained. Early blocks set the semantic layout. (The paper's code freezes
  every block before the first removed one; with ``protect_first=0`` we do the same. Training the kept
  blocks between the prefix and the first gap lets them compensate for late blocks removed downstream.)
- **Sensitivity-Guided Distillation**: the student (pruned) matches the teacher's output and, at every kept
  block, the teacher's hidden states at the same original position. Each block's feature term is weighted
  ``1 + s / max(s)`` by its measured sensitivity ``s``: blocks whose removal hurt most are pulled hardest
  towards the teacher.

Inputs for DiTs are the teacher's own sampling trajectory (:func:`record_inputs`): noisy latents, timesteps
and labels exactly as the sampler feeds the denoiser, CFG's null-label half included. That needs no
training data, covers every timestep the student will see, and works for any pipeline. ViTs distil on
images (the digits training split in the benchmark).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from accel.modules import output_tensor


@dataclass
class InputPool:
    """Recorded forward inputs of a model, sampled as random mini-batches for distillation.

    ``batched``: keyword tensors whose first dim is the sample dim, concatenated over all recorded calls
    (N, ...). ``constant``: other keyword arguments (e.g. Flux's ``img_ids``), passed as recorded.
    """

    batched: dict[str, torch.Tensor]
    constant: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return next(iter(self.batched.values())).shape[0]

    @classmethod
    def from_calls(cls, calls: Sequence[dict[str, Any]]) -> InputPool:
        """Merge recorded keyword calls; tensors with the call's batch size in dim 0 are concatenated."""
        if not calls:
            raise ValueError("InputPool needs at least one recorded call; run the teacher once first.")
        first = calls[0]
        batch = max((v.shape[0] for v in first.values() if isinstance(v, torch.Tensor) and v.dim() > 0), default=0)
        if batch == 0:
            raise ValueError("No batched tensor input found in the recorded calls.")
        keys = [k for k, v in first.items() if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch]
        batched = {k: torch.cat([c[k] for c in calls]) for k in keys}
        constant = {k: v for k, v in first.items() if k not in keys}
        return cls(batched, constant)

    def sample(self, batch_size: int, generator: torch.Generator) -> dict[str, Any]:
        index = torch.randint(len(self), (min(batch_size, len(self)),), generator=generator)
        return {**self.constant, **{k: v[index] for k, v in self.batched.items()}}

    def chunks(self, batch_size: int) -> Iterable[dict[str, Any]]:
        """The whole pool in order, ``batch_size`` samples at a time (for evaluation)."""
        for start in range(0, len(self), batch_size):
            yield {**self.constant, **{k: v[start:start + batch_size] for k, v in self.batched.items()}}


def record_inputs(pipe: Any, calls: Sequence[dict[str, Any]], every: int = 1) -> InputPool:
    """Run ``pipe(**call)`` for each call and record every ``every``-th denoiser forward's keyword inputs.

    Positional inputs are mapped to their parameter names, so the pool can call the model by keyword.
    """
    import inspect

    model = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    names = [p for p in inspect.signature(type(model).forward).parameters if p != "self"]
    recorded: list[dict[str, Any]] = []
    counter = {"n": 0}

    def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if counter["n"] % every == 0:
            call = dict(zip(names, args))
            call.update(kwargs)
            call = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in call.items()
                    if k != "return_dict"}
            recorded.append(call)
        counter["n"] += 1

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for call in tqdm(calls, desc="record teacher trajectory", leave=False):
            with torch.no_grad():
                pipe(**call)
    finally:
        handle.remove()
    return InputPool.from_calls(recorded)


def _normalized_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    # Scale-free: hidden states grow along depth and outputs differ per family; each term is ~1 for "no match".
    return (student.float() - teacher.float()).pow(2).mean() / teacher.float().pow(2).mean().clamp_min(1e-8)


class _FeatureTap:
    """Forward hooks that keep each listed block's hidden-state output of the current forward."""

    def __init__(self, modules: dict[int, torch.nn.Module]) -> None:
        self.features: dict[int, torch.Tensor] = {}
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in modules.items()]

    def _hook(self, index: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            self.features[index] = output_tensor(output)
        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


@dataclass
class DistillResult:
    """What recovery did: steps run, seconds, loss before/after on a fixed held batch, trainable params."""

    steps: int
    seconds: float
    loss_before: float
    loss_after: float
    trainable_params: int
    frozen_blocks: list[int]
    trained_blocks: list[int]
    stopped_by: str

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def feature_weights(kept: Sequence[int], sensitivity: Sequence[float] | None) -> dict[int, float]:
    """``1 + s / max(s)`` per kept original block index (1.0 everywhere without a profile)."""
    if sensitivity is None:
        return {i: 1.0 for i in kept}
    top = max(max(sensitivity), 1e-12)
    return {i: 1.0 + max(0.0, sensitivity[i]) / top for i in kept}


def distill(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    pool: InputPool,
    *,
    student_blocks: dict[int, torch.nn.Module],
    teacher_blocks: dict[int, torch.nn.Module],
    trainable: Sequence[torch.nn.Module],
    weights: dict[int, float],
    steps: int = 300,
    max_seconds: float = 180.0,
    batch_size: int = 32,
    lr: float = 2e-4,
    feature_weight: float = 0.5,
    seed: int = 0,
    progress: bool = True,
) -> DistillResult:
    """Finetune ``trainable`` modules of ``student`` to match ``teacher`` on ``pool`` (in place).

    Loss = normalized MSE of outputs + ``feature_weight`` x the weighted mean of per-block normalized MSE
    between the student's kept block ``i`` and the teacher's block ``i`` (original numbering). Stops
    after ``steps`` or ``max_seconds``, whichever comes first; Ctrl-C stops early and keeps what was learned.
    """
    params = [p for m in trainable for p in m.parameters()]
    trainable_ids = {id(p) for p in params}
    flags = {id(p): p.requires_grad for p in student.parameters()}
    for p in student.parameters():
        p.requires_grad_(id(p) in trainable_ids)
    teacher_was_training = teacher.training
    teacher.eval()  # the teacher runs under no_grad only: its parameters and flags are never touched
    gen = torch.Generator().manual_seed(seed)
    held = pool.sample(batch_size, torch.Generator().manual_seed(seed + 1))
    s_tap, t_tap = _FeatureTap(student_blocks), _FeatureTap(teacher_blocks)
    total_w = sum(weights.values()) or 1.0

    def loss_on(batch: dict[str, Any]) -> torch.Tensor:
        with torch.no_grad():
            t_out = output_tensor(teacher(**batch))
        s_out = output_tensor(student(**batch))
        loss = _normalized_mse(s_out, t_out)
        if feature_weight > 0 and weights:
            feat = sum(w * _normalized_mse(s_tap.features[i], t_tap.features[i]) for i, w in weights.items())
            loss = loss + feature_weight * feat / total_w
        return loss

    def evaluate() -> float:
        student.eval()
        with torch.no_grad():
            return float(loss_on(held))

    try:
        before = evaluate()
        done, stopped_by, start = 0, "steps", time.perf_counter()
        if params and steps > 0:
            optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
            schedule = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
            student.train()
            bar = tqdm(total=steps, desc="distil pruned model", disable=not progress, leave=False)
            try:
                for _ in range(steps):
                    if time.perf_counter() - start > max_seconds:
                        stopped_by = "time budget"
                        break
                    loss = loss_on(pool.sample(batch_size, gen))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    optimizer.step()
                    schedule.step()
                    done += 1
                    bar.update()
                    bar.set_postfix(loss=f"{loss.item():.4f}")
            except KeyboardInterrupt:
                stopped_by = "interrupted"
            finally:
                bar.close()
        after = evaluate()
    finally:
        s_tap.close()
        t_tap.close()
        student.eval()
        teacher.train(teacher_was_training)
        for p in student.parameters():
            p.requires_grad_(flags[id(p)])
    return DistillResult(
        steps=done, seconds=round(time.perf_counter() - start, 1), loss_before=before, loss_after=after,
        trainable_params=sum(p.numel() for p in params), frozen_blocks=[], trained_blocks=[],
        stopped_by=stopped_by,
    )
