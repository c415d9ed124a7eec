"""AdaSpa: blockified sparse attention found by an exact online search, reused across denoising steps.

Paper: Xia et al., "Training-free and Adaptive Sparse Attention for Efficient Long Video Generation"
(arXiv:2502.21079). The score of a (query block, KV block) pair is the attention mass it carries,
``sum exp(q.k/sqrt(d) - LSE_row)``. The first steps run dense; at the search steps the scores are
computed exactly (the first search computes each row's LSE, later searches reuse the cached LSE: one pass;
on the CPU the C++ attention kernel yields the scores with the current LSE from the search step's own dense
attention pass, so a search costs one attention call) and the top blocks at the target sparsity are kept per head; other steps reuse the layer's mask (the
paper's finding: patterns vary by input, layer and head but hardly across steps). Head-adaptive: heads
whose recall at the higher sparsity (1+s)/2 stays high (at most half) get it, as many worst-recall heads
get (3s-1)/2, so the average stays s.

Example::

    patch = accel.patch(pipe, accel.AdaSpaConfig(sparsity=0.8))
    video = pipe(prompt, num_inference_steps=50).frames
    print(patch.report())   # density per step and layer, backend

Training (``training=True``, on a bare denoiser): there are no denoising steps to reuse a pattern across,
so the reuse is across training forwards instead. Each layer searches its exact pattern at its first
forward and again every ``search_every`` forwards (the search is one no-grad scoring pass; the weights move
little between nearby optimizer steps, as the pattern does between nearby denoising steps), and every
forward, search forwards included, runs the sparse attention with gradients
(``accel.attention.trainable``)::

    patch = accel.patch(model.transformer, accel.AdaSpaConfig(training=True, sparsity=0.8, search_every=20))
    loss = flow_loss(model(noisy, t, y), target); loss.backward(); opt.step()
    patch.remove()                                   # the model is exactly as before, trained weights kept
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from accel.attention.backends import AttentionBackend  # noqa: F401 - configs name it here too
from accel.attention.runtime import AttentionCall, Computed, Dense, Plan, SparseAttentionRuntime
from accel.attention.search import attention_and_block_sums, block_sums
from accel.config import MethodConfig, check_bool, check_choice, check_float, check_int
from accel.contract import PatchContext
from accel.registry import Stage, register_method


def check_block_size(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in (64, 128):
        raise ValueError(f"{name} must be 64 or 128 (the kernels' tile sizes), got {value!r}.")
    return value


def check_fractions(name: str, values: Any) -> tuple[float, ...]:
    if isinstance(values, (int, float)):
        values = (values,)
    values = tuple(values)
    for value in values:
        check_float(name, value, low=0.0, high=1.0, high_open=True)
    if list(values) != sorted(set(values)):
        raise ValueError(f"{name} must be increasing fractions of the step count, got {values}.")
    return tuple(float(v) for v in values)


@dataclass(frozen=True, kw_only=True)
class AdaSpaConfig(MethodConfig):
    """AdaSpa settings.

    Args:
        sparsity: fraction of attention blocks skipped per head, in [0, 1).
        block_size: tokens per block, 64 or 128.
        warmup: fraction of the steps run dense first (paper: 10 of 50).
        search_steps: when to search, as fractions of the steps (paper: steps 10 and 30 of 50); the
            first search computes the LSE, later ones reuse it. Steps between reuse the latest mask.
        head_adaptive: per-head sparsity by recall (the paper's rule); ``recall_threshold`` is its bar.
        text_sink: joint text is always attended (accel never drops text); ``True`` keeps text blocks
            on top of the budget, ``False`` counts them inside it.
        first_frame_sink: always attend the first frame's blocks.
        row_wise: top-k per query block instead of per head.
        backend: ``auto``, ``triton``, ``cpp``, ``flex``, ``gather`` or ``reference``.
        training: search per layer at its first forward and every ``search_every`` forwards after, with no
            warm-up and no step placement, for training through the sparse attention (see the module doc).
        search_every: forwards of a layer between its searches in training.
    """

    sparsity: float = 0.8
    block_size: int = 64
    warmup: float = 0.2
    search_steps: tuple[float, ...] = (0.2, 0.6)
    head_adaptive: bool = True
    recall_threshold: float = 0.8
    text_sink: bool = True
    first_frame_sink: bool = False
    row_wise: bool = False
    backend: AttentionBackend = AttentionBackend.AUTO
    training: bool = False
    search_every: int = 20

    def __post_init__(self) -> None:
        check_bool("AdaSpaConfig.training", self.training)
        check_int("AdaSpaConfig.search_every", self.search_every, low=1, hint="(forwards of a layer between its searches)")
        check_float("AdaSpaConfig.sparsity", self.sparsity, low=0.0, high=1.0, high_open=True,
                    hint="use sparsity=0 for dense attention; 1 would attend nothing.")
        check_block_size("AdaSpaConfig.block_size", self.block_size)
        check_float("AdaSpaConfig.warmup", self.warmup, low=0.0, high=1.0, high_open=True)
        object.__setattr__(self, "search_steps", check_fractions("AdaSpaConfig.search_steps", self.search_steps))
        if not self.search_steps:
            raise ValueError("AdaSpaConfig.search_steps needs at least one search step, got ().")
        check_float("AdaSpaConfig.recall_threshold", self.recall_threshold, low=0.0, high=1.0)
        object.__setattr__(self, "backend", check_choice("AdaSpaConfig.backend", self.backend, AttentionBackend))

    @classmethod
    def sweep_grid(cls, num_steps: int) -> list[dict[str, Any]]:
        return [{"sparsity": 0.5}, {"sparsity": 0.7}, {"sparsity": 0.8}, {"sparsity": 0.9}]


def head_sparsities(sums: torch.Tensor, sparsity: float, threshold: float) -> torch.Tensor:
    """(H,) per-head sparsity by the paper's rule from block scores ``sums`` (B, H, Qb, Kb)."""
    H = sums.shape[1]
    high, low = (1 + sparsity) / 2, max(0.0, (3 * sparsity - 1) / 2)
    out = torch.full((H,), sparsity)
    recall = recall_at(sums, high).mean(0)  # (H,)
    n = min(int((recall >= threshold).sum()), H // 2)
    if n == 0:
        return out
    order = torch.argsort(recall, descending=True, stable=True)
    out[order[:n]] = high
    out[order[-n:]] = low
    return out


def recall_at(sums: torch.Tensor, sparsity: float) -> torch.Tensor:
    """(B, H) fraction of the attention mass kept by each head's top (1 - sparsity) blocks."""
    flat = sums.flatten(2)
    keep = max(1, round((1 - sparsity) * flat.shape[-1]))
    top = flat.topk(keep, dim=-1).values.sum(-1)
    return top / flat.sum(-1).clamp_min(1e-12)


def select_blocks(sums: torch.Tensor, sparsity: torch.Tensor, forced: torch.Tensor | None = None,
                  row_wise: bool = False) -> torch.Tensor:
    """(B, H, Qb, Kb) bool: per head the top ``1 - sparsity[h]`` of blocks by score (or per row with
    ``row_wise``), ``forced`` blocks counted inside the budget, and every row keeps its best block."""
    B, H, Qb, Kb = sums.shape
    scores = sums.float().clone()
    if forced is not None:
        scores = scores.masked_fill(forced, float("inf"))
    table = torch.zeros(B, H, Qb, Kb, dtype=torch.bool, device=sums.device)
    for h in range(H):
        keep_frac = 1.0 - float(sparsity[h])
        if row_wise:
            keep = max(1, round(keep_frac * Kb))
            idx = scores[:, h].topk(keep, dim=-1).indices
            table[:, h].scatter_(-1, idx, True)
        else:
            keep = max(Qb, round(keep_frac * Qb * Kb))
            idx = scores[:, h].flatten(1).topk(keep, dim=-1).indices
            table[:, h].view(B, -1).scatter_(-1, idx, True)
    best = scores.argmax(-1, keepdim=True)  # no query block may end up attending nothing
    table.scatter_(-1, best, True)
    return table


@dataclass
class _LayerCache:
    table: torch.Tensor
    lse: torch.Tensor
    step: int


class AdaSpa(SparseAttentionRuntime):
    """Runtime of one AdaSpa patch: per (layer, CFG branch) the latest mask and LSE."""

    method = "adaspa"

    def __init__(self, ctx: PatchContext, config: AdaSpaConfig) -> None:
        self.config = config
        self.cache: dict[tuple[str, int], _LayerCache] = {}
        # fused: the C++ CPU kernel's attention pass gave the scores (exact, current LSE)
        self.searches: dict[str, int] = {"two_pass": 0, "one_pass": 0, "fused": 0}
        self.searched: dict[tuple[str, int], set[float]] = {}  # per layer: search fractions reached
        self.training = config.training
        self.forwards: dict[tuple[str, int], int] = {}  # training: forwards per layer since its last search
        super().__init__(ctx, config.block_size, config.backend.value)

    def reset(self) -> None:
        if self.training:  # each training forward looks like a new sequence: the patterns outlive it
            self.stats.records.clear()
            return
        super().reset()

    def drop_caches(self) -> None:
        super().drop_caches()
        self.cache.clear()
        self.searched.clear()
        self.forwards.clear()

    def _search_steps(self, num_steps: int) -> tuple[int, set[int]]:
        warm = round(self.config.warmup * num_steps)
        return warm, {max(warm, round(f * num_steps)) for f in self.config.search_steps}

    def _is_search_step(self, call: AttentionCall, key: tuple[str, int]) -> bool:
        """With a step count: the steps at the search fractions. Without one (a hand-written loop), the
        first step of this layer whose noise-level progress reaches each search fraction."""
        if call.num_steps is not None:
            return call.step in self._search_steps(call.num_steps)[1]
        done = self.searched.setdefault(key, set())
        due = {f for f in self.config.search_steps if not call.before(max(f, self.config.warmup))} - done
        done.update(due)
        return bool(due)

    def _key(self, call: AttentionCall) -> tuple[str, int]:
        """Per layer and CFG branch; in training per layer only (repeated timesteps there are new batches,
        not branches)."""
        return (call.layer.name, 0 if self.training else call.branch)

    def select(self, call: AttentionCall) -> Plan | Computed | Dense:
        key = self._key(call)
        cached = self.cache.get(key)
        if not self.adapter.is_denoiser:  # one forward per input: search and apply at once
            return Plan(self._search(call, None))
        if self.training:
            return Plan(self._training_table(call, key, cached))
        if call.before(self.config.warmup):
            return Dense("warm-up")
        shape_ok = cached is not None and cached.lse.shape == call.q.shape[:3]
        if self._is_search_step(call, key) or not shape_ok:
            fused = attention_and_block_sums(call.q, call.k, call.v, call.block_size, call.scale, call.key_mask,
                                             self.backend)
            if fused is not None:  # the search step's dense attention and its scores in one pass
                out, sums, lse = fused
                self.searches["fused"] += 1
                self._choose(call, sums, lse)
                return Computed(out, "search")
            reuse = cached.lse if shape_ok and cached.step < call.step else None
            self._search(call, reuse)
            return Dense("search")  # the search step has paid for full attention scores: it runs dense
        return Plan(cached.table)

    @torch.no_grad()  # the search is discrete: no gradient flows through the block scores
    def _training_table(self, call: AttentionCall, key: tuple[str, int], cached: _LayerCache | None
                        ) -> torch.Tensor:
        """Training: the layer's latest pattern, searched again (two-pass, fresh LSE: the weights moved)
        at its first forward, every ``search_every`` forwards, and whenever the sequence shape changes."""
        count = self.forwards.get(key, 0)
        if cached is None or cached.lse.shape != call.q.shape[:3] or count >= self.config.search_every:
            self.forwards[key] = 1
            return self._search(call, None)
        self.forwards[key] = count + 1
        return cached.table

    def _search(self, call: AttentionCall, lse: torch.Tensor | None) -> torch.Tensor:
        self.searches["two_pass" if lse is None else "one_pass"] += 1
        sums, lse = block_sums(call.q, call.k, call.block_size, call.scale, lse, call.key_mask)
        return self._choose(call, sums, lse)

    def _choose(self, call: AttentionCall, sums: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        """The block table from the scores (head-adaptive budget, sinks), cached for the following steps."""
        config = self.config
        H = sums.shape[1]
        if config.head_adaptive and H > 1:
            per_head = head_sparsities(sums, config.sparsity, config.recall_threshold)
        else:
            per_head = torch.full((H,), config.sparsity)
        forced = self._forced_blocks(call, sums.shape)
        table = select_blocks(sums, per_head, forced, config.row_wise)
        self.cache[self._key(call)] = _LayerCache(table, lse, call.step)
        return table

    def _forced_blocks(self, call: AttentionCall, shape: torch.Size) -> torch.Tensor | None:
        """Blocks counted inside the budget: first-frame sink columns; text when ``text_sink=False``."""
        nb = shape[-1]
        cols = torch.zeros(nb, dtype=torch.bool, device=call.q.device)
        if self.config.first_frame_sink:
            cols |= call.geometry.frame_blocks(1, call.block_size, call.q.device)
        if not self.config.text_sink:
            cols |= call.geometry.special_blocks(call.block_size, call.q.device)
        if not bool(cols.any()):
            return None
        return cols.view(1, 1, 1, nb).expand(shape)

    def report(self) -> dict[str, Any]:
        return {**super().report(), "searches": dict(self.searches)}


@register_method(AdaSpaConfig, name="adaspa", stage=Stage.ATTENTION,
                 summary="AdaSpa: exact block search at a few steps, cached masks, head-adaptive sparsity; "
                         "trainable")
def _apply(ctx: PatchContext, config: AdaSpaConfig) -> AdaSpa:
    return AdaSpa(ctx, config)
