"""HierarchicalPrune: remove late, insensitive blocks; protect early ones; distil the rest back.

Paper: "HierarchicalPrune: Position-Aware Compression for Large-Scale Diffusion Models" (SamsungLabs,
SD3.5 / FLUX). Three parts, each in ``accel.prune``:

1. **Hierarchical Position Pruning** (``select``): blocks after a protected prefix, ranked by position and
   by the measured quality drop of removing each alone (``sensitivity.analyze_blocks``), removed to a
   ``ratio`` or a ``latency_budget``.
2. **Positional Weight Preservation** (``distill``): the protected early blocks stay frozen in recovery.
3. **Sensitivity-Guided Distillation** (``distill``): the blocks after it (and the output layers) match the
   teacher's output and per-block features, weighted by sensitivity, on the teacher's own trajectory.

The offline step :func:`prune` writes an artifact (removed blocks + distilled weights) and returns a real
smaller model; ``accel.patch`` with ``artifact=`` applies it to the original in place (undone exactly by
``patch.remove()``). Without an artifact, ``accel.patch`` removes blocks by position (and a saved profile)
without finetuning: structural and instant, but less accurate than the artifact.

Example::

    result = hierarchical_prune.prune(pipe, HierarchicalPruneConfig(ratio=0.3), save_to="hp-digits")
    result.save_pretrained("digits-dit-pruned")            # loads with DiTTransformer2DModel.from_pretrained
    patch = accel.patch(pipe, HierarchicalPruneConfig(artifact="hp-digits"))
    images = pipe(class_labels=[3], num_inference_steps=50).images; patch.remove()
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from accel.artifacts import architecture_fingerprint, weights_digest
from accel.config import MethodConfig, check_float, check_int
from accel.contract import PatchContext
from accel.modules import resolve_target
from accel.prune.artifact import PruneArtifact
from accel.prune.distill import DistillResult, InputPool, distill, feature_weights, record_inputs
from accel.prune.export import save_diffusers, save_timm, timm_kwargs_after
from accel.prune.select import predicted_latency, protected_prefix, select_blocks
from accel.prune.sensitivity import SensitivityProfile, analyze_blocks
from accel.prune.structure import (
    PrunableBlock,
    block_param_fractions,
    check_removal,
    config_updates,
    parameter_bytes,
    pinned_blocks,
    prunable_blocks,
    removed_by_container,
    set_config,
    swap_blocks,
)
from accel.registry import Stage, find_adapter, register_method

logger = logging.getLogger(__name__)

#: The ratio used when neither ``ratio`` nor ``latency_budget`` is given.
DEFAULT_RATIO = 0.3


@dataclass(frozen=True, kw_only=True)
class HierarchicalPruneConfig(MethodConfig):
    """HierarchicalPrune settings.

    Args:
        ratio: fraction of blocks to remove, in (0, 1); rounded up to whole blocks (0.3 of 8 -> 3).
            Default 0.3 when no ``latency_budget`` is given.
        latency_budget: target forward latency as a fraction of the unpruned one, in (0, 1); blocks are
            removed until the predicted latency fits (measured block time shares from the profile, else a
            parameter-count estimate).
        artifact: folder written by :func:`prune`: applies its removed blocks and distilled weights.
        profile: JSON from ``analyze_blocks(...).save(path)``: measured sensitivity guides the choice.
        protect_first: leading fraction of blocks never removed (Positional Weight Preservation).
        position_weight: weight of position vs measured sensitivity in the ranking, in [0, 1].
        distill_steps / distill_minutes: recovery budget of :func:`prune` (whichever ends first).
        distill_lr, batch_size, feature_weight: optimiser step size, samples per step, and weight of the
            per-block feature loss against the output loss.
        train_head: also finetune the output layers after the last block list.
        seed: seeds distillation batches.
    """

    ratio: float | None = None
    latency_budget: float | None = None
    artifact: str | None = None
    profile: str | None = None
    protect_first: float = 0.25
    position_weight: float = 0.3
    distill_steps: int = 400
    distill_minutes: float = 4.0
    distill_lr: float = 3e-4
    batch_size: int = 48
    feature_weight: float = 0.5
    train_head: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.ratio is not None:
            check_float("HierarchicalPruneConfig.ratio", self.ratio, low=0.0, high=1.0, low_open=True, high_open=True,
                        hint="It is the fraction of blocks removed, e.g. ratio=0.3.")
        if self.latency_budget is not None:
            check_float("HierarchicalPruneConfig.latency_budget", self.latency_budget, low=0.0, high=1.0,
                        low_open=True, high_open=True, hint="It is a fraction of the unpruned latency, e.g. 0.7.")
        if self.ratio is not None and self.latency_budget is not None:
            raise ValueError("HierarchicalPruneConfig takes ratio or latency_budget, not both; got "
                             f"ratio={self.ratio}, latency_budget={self.latency_budget}.")
        if self.artifact is not None and (self.ratio is not None or self.latency_budget is not None):
            raise ValueError("HierarchicalPruneConfig.artifact already fixes the removed blocks; drop ratio / "
                             "latency_budget, or drop artifact to choose blocks anew.")
        check_float("HierarchicalPruneConfig.protect_first", self.protect_first, low=0.0, high=1.0, high_open=True)
        check_float("HierarchicalPruneConfig.position_weight", self.position_weight, low=0.0, high=1.0)
        check_int("HierarchicalPruneConfig.distill_steps", self.distill_steps, low=0)
        check_float("HierarchicalPruneConfig.distill_minutes", self.distill_minutes, low=0.0, low_open=True)
        check_float("HierarchicalPruneConfig.distill_lr", self.distill_lr, low=0.0, low_open=True)
        check_int("HierarchicalPruneConfig.batch_size", self.batch_size, low=1)
        check_float("HierarchicalPruneConfig.feature_weight", self.feature_weight, low=0.0)

    @property
    def effective_ratio(self) -> float | None:
        return self.ratio if self.ratio is not None or self.latency_budget is not None else DEFAULT_RATIO

    @classmethod
    def sweep_grid(cls, num_steps: int) -> list[dict[str, Any]]:
        """Settings ``accel-bench --sweep`` tries."""
        return [{"ratio": r} for r in (0.2, 0.3, 0.4)]


def choose_blocks(model: torch.nn.Module, config: HierarchicalPruneConfig,
                  profile: SensitivityProfile | None = None) -> list[int]:
    """Indices of the blocks ``config`` removes from ``model`` (ratio or latency budget, profile-guided)."""
    blocks = prunable_blocks(find_adapter(model))
    if profile is not None and len(profile.blocks) != len(blocks):
        raise ValueError(f"The sensitivity profile covers {len(profile.blocks)} blocks, the model has {len(blocks)}; "
                         "measure this model with analyze_blocks(...).")
    time_fraction = None
    if config.latency_budget is not None:
        measured = profile.time_fraction if profile is not None and profile.time_fraction else None
        time_fraction = measured or block_param_fractions(model, blocks)
    removed = select_blocks(
        len(blocks), ratio=config.effective_ratio, latency_budget=config.latency_budget,
        score=profile.score if profile is not None else None, time_fraction=time_fraction,
        pinned=pinned_blocks(model, blocks), protect_first=config.protect_first,
        position_weight=config.position_weight,
    )
    return check_removal(model, blocks, removed)


def head_modules(model: torch.nn.Module, blocks: list[PrunableBlock]) -> dict[str, torch.nn.Module]:
    """Top-level children registered after the last block list: the output layers (norm_out/proj_out, timm's
    norm/head). The forward runs them after the blocks in every supported family."""
    tops = {b.container.split(".")[0] for b in blocks}
    names = list(model._modules)
    last = max(names.index(t) for t in tops)
    after = list(model._modules.items())[last + 1:]
    return {n: m for n, m in after if m is not None and any(True for _ in m.parameters())}


def frozen_prefix(n: int, removed: list[int], protect_first: float) -> int:
    """Positional Weight Preservation: blocks before this index stay frozen during recovery.

    The protected prefix (``protect_first``), which selection never removes; with no protection, every
    block before the first removed one (the paper's code). Kept blocks from there on are trained: those
    between the prefix and the first gap can still compensate for blocks removed downstream.
    """
    prefix = protected_prefix(n, protect_first)
    return prefix if prefix > 0 else min(removed)


@dataclass
class PruneResult:
    """What :func:`prune` made: the smaller model, the artifact that recreates it, and how it got there."""

    model: torch.nn.Module
    artifact: PruneArtifact
    profile: SensitivityProfile | None
    distill: DistillResult | None
    removed: list[int]
    source_blocks: list[str]
    lengths: dict[str, int]
    timm_kwargs: dict[str, Any] | None = None

    def pipeline(self, pipe: Any) -> Any:
        """A new pipeline of ``pipe``'s class sharing its components, with the pruned denoiser."""
        attr = "transformer" if hasattr(pipe, "transformer") else "unet"
        pruned = type(pipe)(**{**pipe.components, attr: self.model})
        if hasattr(pruned, "set_progress_bar_config"):
            pruned.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
        return pruned

    def save_pretrained(self, folder: str | Path, pipe: Any | None = None) -> Path:
        """Save in the library's own format: diffusers (the model, or the whole ``pipe`` with it) or timm."""
        if hasattr(self.model, "save_pretrained"):
            if pipe is not None:
                save_diffusers(self.model, Path(folder) / ("transformer" if hasattr(pipe, "transformer") else "unet"))
                self.pipeline(pipe).save_pretrained(str(folder))
                return Path(folder)
            return save_diffusers(self.model, folder)
        if self.timm_kwargs is None:
            raise ValueError("Saving a pruned timm model needs its create_model kwargs: prune(..., timm_kwargs={...}) "
                             "with 'model_name' and the original depth.")
        return save_timm(self.model, folder, self.timm_kwargs)


def prune(
    target: Any,
    config: HierarchicalPruneConfig | None = None,
    *,
    profile: SensitivityProfile | str | None = None,
    analyze: bool = True,
    removed: list[int] | None = None,
    pool: InputPool | None = None,
    timm_kwargs: dict[str, Any] | None = None,
    save_to: str | Path | None = None,
    progress: bool = True,
) -> PruneResult:
    """The offline step: analyse, choose blocks, build the smaller model, distil it, write the artifact.

    Args:
        target: a pipeline (its denoiser is pruned) or a model (e.g. a timm ViT). Never modified.
        config: ratio / latency budget, protection and distillation settings.
        profile: a measured profile (object or JSON path); ``config.profile`` is used when None, else
            ``analyze_blocks(target)`` runs when ``analyze`` is True (pipelines: PSNR over default calls;
            classifiers: the output-error proxy on ``pool``).
        removed: explicit block indices (overrides the choice; e.g. baselines in the benchmark).
        pool: distillation inputs; default: the teacher's trajectory over default calls for pipelines;
            classifiers need one (``InputPool({"x": images})``).
        timm_kwargs: create_model kwargs of a timm model (for ``save_pretrained``).
        save_to: folder for the artifact.
    """
    config = config or HierarchicalPruneConfig()
    pipe, model = resolve_target(target)
    blocks = prunable_blocks(find_adapter(model))
    if isinstance(profile, (str, Path)):
        profile = SensitivityProfile.load(profile)
    if profile is None and config.profile is not None:
        profile = SensitivityProfile.load(config.profile)
    if profile is None and analyze and removed is None:
        classifier = pipe is None and not find_adapter(model).is_denoiser
        profile = analyze_blocks(target, pool=pool if classifier else None, progress=progress)
    removed = check_removal(model, blocks, removed) if removed is not None else choose_blocks(model, config, profile)
    student = copy.deepcopy(model)
    s_blocks = prunable_blocks(find_adapter(student))
    lengths = swap_blocks(student, s_blocks, removed)
    set_config(student, config_updates(student, lengths, removed_by_container(s_blocks, removed)))
    kept = [b.index for b in blocks if b.index not in set(removed)]
    result_distill = None
    weights: dict[str, torch.Tensor] = {}
    if config.distill_steps > 0:
        pool = pool if pool is not None else default_pool(pipe, model)
        frozen_before = frozen_prefix(len(blocks), removed, config.protect_first)
        trained = [i for i in kept if i >= frozen_before]
        heads = head_modules(student, s_blocks) if config.train_head else {}
        trainable = [s_blocks[i].module for i in trained] + list(heads.values())
        score = profile.score if profile is not None else None
        result_distill = distill(
            student, model, pool,
            student_blocks={i: s_blocks[i].module for i in kept},
            teacher_blocks={i: blocks[i].module for i in kept},
            trainable=trainable, weights=feature_weights(kept, score), steps=config.distill_steps,
            max_seconds=60 * config.distill_minutes, batch_size=config.batch_size, lr=config.distill_lr,
            feature_weight=config.feature_weight, seed=config.seed, progress=progress,
        )
        result_distill.frozen_blocks = [i for i in kept if i < frozen_before]
        result_distill.trained_blocks = trained
        for i in trained:
            weights.update({f"{blocks[i].name}.{k}": v.clone() for k, v in s_blocks[i].module.state_dict().items()})
        for name, module in heads.items():
            weights.update({f"{name}.{k}": v.clone() for k, v in module.state_dict().items()})
    artifact = PruneArtifact(
        source=architecture_fingerprint(model), source_weights=weights_digest(model, rounded=True),
        blocks=[b.name for b in blocks],
        removed=removed, settings=config.to_dict(), weights=weights,
        profile=profile.to_json() if profile is not None else None,
        distill=result_distill.to_json() if result_distill is not None else None,
    )
    if save_to is not None:
        artifact.save(save_to)
    kwargs = timm_kwargs_after(timm_kwargs, lengths) if timm_kwargs is not None else None
    return PruneResult(student.eval(), artifact, profile, result_distill, removed, [b.name for b in blocks],
                       lengths, kwargs)


def default_pool(pipe: Any | None, model: torch.nn.Module, per_class: int = 2, steps: int = 50,
                 guidance_scale: float = 4.0) -> InputPool:
    """Distillation inputs when none are given (see ``accel.prune.distill`` for why the trajectory)."""
    if pipe is not None:
        from accel.calls import default_calls, default_conditions

        calls = default_calls(pipe, [500], steps, default_conditions(pipe) * per_class,
                              guidance_scale=guidance_scale)
        return record_inputs(pipe, calls)
    if not find_adapter(model).is_denoiser:
        raise ValueError(f"prune() needs distillation images for the classifier {type(model).__name__}: pass "
                         "pool=accel.prune.InputPool({'x': images}) (training images, (N, C, H, W)), or set "
                         "distill_steps=0.")
    raise ValueError(f"prune() needs distillation inputs for {type(pipe or model).__name__}: pass pool="
                     "accel.prune.distill.record_inputs(pipe, calls) (a few pipeline calls), or set distill_steps=0.")


UNDISTILLED_WARNING = (
    "hierarchical-prune without an artifact: blocks {removed} removed by {source}, with no distillation, so "
    "quality drops more than it needs to. accel.methods.hierarchical_prune.prune(pipe, config, "
    "save_to=folder) distills the kept blocks; then patch with HierarchicalPruneConfig(artifact=folder)."
)


class HierarchicalPrune:
    """Runtime of one patch: what was removed, and the memory it saved."""

    def __init__(self, names: list[str], removed: list[int], source: str, bytes_before: int, bytes_after: int,
                 latency: float | None) -> None:
        self.names, self.removed, self.source = names, removed, source
        self.bytes_before, self.bytes_after, self.latency = bytes_before, bytes_after, latency

    def remove(self) -> None:
        """Nothing to drop: the removed blocks come back through the patch's hooks."""

    def report(self) -> dict[str, Any]:
        out = {"removed_blocks": [self.names[i] for i in self.removed],
               "blocks": f"{len(self.names) - len(self.removed)}/{len(self.names)} kept",
               "chosen_by": self.source,
               "parameter_bytes": f"{self.bytes_before:,} -> {self.bytes_after:,}"}
        if self.latency is not None:
            out["predicted_latency"] = round(self.latency, 3)
        if not self.source.startswith("artifact"):
            out["warning"] = UNDISTILLED_WARNING.format(removed=self.removed, source=self.source)
        return out


def _load_into_copy(module: torch.nn.Module, prefix: str,
                    weights: dict[str, torch.Tensor]) -> torch.nn.Module | None:
    """A copy of ``module`` with the artifact's tensors under ``prefix`` (None if it has none): the original
    block stays untouched, so removing the patch restores it exactly."""
    own = {k[len(prefix) + 1:]: v for k, v in weights.items() if k.startswith(prefix + ".")}
    if not own:
        return None
    clone = copy.deepcopy(module)
    clone.load_state_dict(own, strict=True)
    return clone


@register_method(HierarchicalPruneConfig, name="hierarchical-prune", stage=Stage.PRUNE,
                 summary="HierarchicalPrune: remove late, insensitive blocks (distilled weights from an artifact)")
def _apply(ctx: PatchContext, config: HierarchicalPruneConfig) -> HierarchicalPrune:
    model = ctx.model
    blocks = prunable_blocks(ctx.adapter)
    bytes_before = parameter_bytes(model)
    replacements: dict[int, torch.nn.Module] = {}
    latency = None
    if config.artifact is not None:
        artifact = PruneArtifact.load(config.artifact)
        artifact.check_model(model)
        removed = check_removal(model, blocks, artifact.removed)
        for i in artifact.kept:
            clone = _load_into_copy(blocks[i].module, blocks[i].name, artifact.weights)
            if clone is not None:
                replacements[i] = clone
        for name, module in head_modules(model, blocks).items():
            clone = _load_into_copy(module, name, artifact.weights)
            if clone is not None:
                ctx.hooks.set_attr(model, name, clone)
        source = f"artifact {config.artifact}"
    else:
        profile = SensitivityProfile.load(config.profile) if config.profile is not None else None
        removed = choose_blocks(model, config, profile)
        source = "measured sensitivity + position" if profile is not None else "position"
        if config.latency_budget is not None:
            shares = profile.time_fraction if profile is not None and profile.time_fraction else \
                block_param_fractions(model, blocks)
            latency = predicted_latency(shares, removed)
        warnings.warn(UNDISTILLED_WARNING.format(removed=removed, source=source), UserWarning, stacklevel=4)
    lengths = swap_blocks(model, blocks, removed, replacements, setter=ctx.hooks.set_attr)
    updates = config_updates(model, lengths, removed_by_container(blocks, removed))
    set_config(model, updates, setter=ctx.hooks.set_attr)  # config.num_layers follows the block list
    return HierarchicalPrune([b.name for b in blocks], removed, source, bytes_before, parameter_bytes(model),
                             latency)


def prune_then_quantize(target: Any, prune_config: HierarchicalPruneConfig, quant_config: Any = None) -> Any:
    """Prune (artifact or position) then quantize weights to 4 bits with QuEST, in one patch, in that order.

    ``accel.patch`` orders prune before quantize (``Stage``), so QuEST quantizes the pruned block list (and a
    QuEST artifact must be made on the pruned model). Default QuEST settings need no data: int4 weights,
    dynamic per-token 8-bit activations, no finetuning. Returns ``(patch, memory)`` with
    ``memory = {"fp32_bytes", "pruned_bytes", "quantized_bytes", "ratio"}`` (ratio: quantized / fp32).
    """
    import accel
    from accel.methods import quest

    _, model = resolve_target(target)
    before = parameter_bytes(model)
    # Memory is the point here: every layer 4-bit, even where a float layer would run faster.
    quant_config = quant_config or quest.QuESTConfig(bits="w4a8", act_granularity="per_token",
                                                     finetune_iters=0, keep_float_when_faster=False)
    patch = accel.patch(target, prune_config, quant_config)
    pruned = patch.handle("hierarchical-prune").bytes_after
    quantized = getattr(patch.handle("quest"), "quant_bytes", parameter_bytes(model))
    memory = {"fp32_bytes": before, "pruned_bytes": pruned, "quantized_bytes": int(quantized),
              "ratio": int(quantized) / before}
    return patch, memory
