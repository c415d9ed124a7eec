"""VMoBA: mixture-of-block attention over 1D/2D/3D video chunks, training-free.

Paper: Wu et al., "VMoBA: Mixture-of-Block Attention for Video Diffusion Models" (arXiv:2506.23858),
built on MoBA. Layer ``l`` partitions the video tokens by ``l mod 3``: 1D runs of whole frames, 2D
spatial tiles spanning all frames, 3D spatio-temporal cubes. Tokens are reordered by an exact
permutation so each chunk is contiguous. A query block scores each chunk by (mean query of the block) .
(mean key of the chunk) - MoBA's score at block granularity - always attends its own chunk(s), and adds
chunks by one of three rules: local + top-k (the paper's training-free setting, default), per-head global
top-k, or a cumulative threshold over min-max-normalised scores (tau). The first 25% of steps run dense.

Example::

    patch = accel.patch(pipe, accel.VMoBAConfig(top_k=3))
    video = pipe(prompt, num_inference_steps=50).frames
    print(patch.report())

Training (the paper's first use): patch the bare denoiser with ``training=True``; every forward selects
chunks (no dense warm-up: there are no denoising steps) and gradients flow through the sparse attention
(``accel.attention.trainable``)::

    config = accel.VMoBAConfig(training=True, selection="threshold", tau=0.25, chunk_tokens=512)
    patch = accel.patch(model.transformer, config)
    loss = flow_loss(model(noisy, t, y), target); loss.backward(); opt.step()
    patch.remove()                                   # the model is exactly as before, trained weights kept
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

import torch

from accel.attention.runtime import AttentionCall, Dense, Plan, SparseAttentionRuntime
from accel.attention.tokens import Partition, SequenceGeometry, partition_permutation
from accel.config import MethodConfig, check_bool, check_choice, check_float, check_int
from accel.contract import PatchContext
from accel.methods.adaspa import AttentionBackend, check_block_size
from accel.registry import Stage, register_method

PARTITIONS: tuple[Partition, ...] = tuple(Partition)  # layer i uses PARTITIONS[i % 3]


class Selection(str, enum.Enum):
    """How chunks beyond the query's own are chosen."""

    TOPK = "topk"  # local + top-k per query block (the paper's training-free results)
    GLOBAL = "global"  # the top (top_k x query blocks) pairs across the whole head
    THRESHOLD = "threshold"  # pairs by descending score until their share of the head's total reaches tau


@dataclass(frozen=True, kw_only=True)
class VMoBAConfig(MethodConfig):
    """VMoBA settings.

    Args:
        block_size: kernel tile in tokens, 64 or 128.
        chunk_tokens: target tokens per chunk; chunk shapes follow from the token grid (1D: whole frames,
            or row runs for images; 2D: square tiles over all frames; 3D: cubes).
        selection: ``topk`` (default), ``global`` or ``threshold``.
        top_k: chunks added per query block (``topk``; ``global`` keeps ``top_k`` per block on average).
        density: instead of ``top_k``, the share of a layer's chunks each query block attends, own chunks
            included (``topk``/``global``), so 1D layers (few whole-frame chunks) and 2D/3D layers (many
            small ones) attend alike: ``top_k`` becomes ``round(density * chunks) - 1`` per layer (at least 0).
        tau: share of a head's normalised score mass to keep (``threshold``), in (0, 1].
        warmup: fraction of the steps run dense first (inference only).
        backend: ``auto``, ``triton``, ``cpp``, ``flex``, ``gather`` or ``reference`` (the forward's kernel;
            with gradients, ``torch.ops.accel.block_sparse_attention`` runs whatever the device has).
        training: select in every forward with no warm-up and no step placement, for training through
            the sparse attention (gradients to q, k and v of every attended block).
    """

    block_size: int = 64
    chunk_tokens: int = 256
    selection: Selection = Selection.TOPK
    top_k: int = 3
    density: float | None = None
    tau: float = 0.25
    warmup: float = 0.25
    backend: AttentionBackend = AttentionBackend.AUTO
    training: bool = False

    def __post_init__(self) -> None:
        check_block_size("VMoBAConfig.block_size", self.block_size)
        check_bool("VMoBAConfig.training", self.training)
        check_int("VMoBAConfig.chunk_tokens", self.chunk_tokens, low=1)
        object.__setattr__(self, "selection", check_choice("VMoBAConfig.selection", self.selection, Selection))
        check_int("VMoBAConfig.top_k", self.top_k, low=0)
        if self.density is not None:
            check_float("VMoBAConfig.density", self.density, low=0.0, high=1.0, low_open=True)
        check_float("VMoBAConfig.tau", self.tau, low=0.0, high=1.0, low_open=True)
        check_float("VMoBAConfig.warmup", self.warmup, low=0.0, high=1.0, high_open=True)
        object.__setattr__(self, "backend", check_choice("VMoBAConfig.backend", self.backend, AttentionBackend))

    @classmethod
    def sweep_grid(cls, num_steps: int) -> list[dict[str, Any]]:
        return [{"top_k": 5}, {"top_k": 3}, {"top_k": 1}]


def chunk_shape(geometry: SequenceGeometry, mode: Partition | str, tokens: int
                ) -> tuple[Partition, tuple[int, int, int]]:
    """``(mode for chunk_ids, (frames, rows, cols))`` of one chunk of about ``tokens`` tokens."""
    T, H, W = geometry.frames, geometry.height, geometry.width
    mode = Partition(mode)
    if mode is Partition.ONE_D:
        if T > 1:
            return Partition.ONE_D, (max(1, tokens // (H * W)), H, W)
        return Partition.TWO_D, (1, max(1, tokens // W), W)  # an image: runs of whole rows
    if mode is Partition.TWO_D:
        side = max(1, round(math.sqrt(max(1, tokens // T))))
        return Partition.TWO_D, (1, min(H, side), min(W, side))
    ct = min(T, max(1, round(tokens ** (1 / 3))))
    side = max(1, round(math.sqrt(tokens / ct)))
    return Partition.THREE_D, (ct, min(H, side), min(W, side))


def chunk_membership(chunk_of: torch.Tensor, block_size: int) -> torch.Tensor:
    """(C, nb) bool: which blocks of the permuted sequence hold tokens of each chunk (ids >= 0)."""
    C = int(chunk_of.max()) + 1
    nb = math.ceil(chunk_of.numel() / block_size)
    member = torch.zeros(C + 1, nb, dtype=torch.bool)
    block = torch.arange(chunk_of.numel()) // block_size
    member[chunk_of.clamp_min(-1) % (C + 1), block] = True  # special tokens (-1) land in row C
    return member[:C]


def chunk_scores(q: torch.Tensor, k: torch.Tensor, chunk_of: torch.Tensor, block_size: int,
                 key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, Qb, C): mean query of each block . mean key of each chunk (permuted sequence)."""
    B, H, S, D = q.shape
    nb = math.ceil(S / block_size)
    qpad = torch.nn.functional.pad(q.float(), (0, 0, 0, nb * block_size - S)).reshape(B, H, nb, block_size, D)
    counts = torch.full((nb,), float(block_size), device=q.device)
    counts[-1] = S - (nb - 1) * block_size
    q_mean = qpad.sum(3) / counts.view(1, 1, nb, 1)
    C = int(chunk_of.max()) + 1
    valid = (chunk_of >= 0).to(q.device)
    onehot = torch.zeros(S, C, device=q.device)
    onehot[valid, chunk_of.to(q.device)[valid]] = 1.0
    weights = onehot.expand(B, S, C)
    if key_mask is not None:
        weights = weights * key_mask.unsqueeze(-1).float()
    k_mean = torch.einsum("bhsd,bsc->bhcd", k.float(), weights) / weights.sum(1).clamp_min(1.0).unsqueeze(1).unsqueeze(-1)
    return torch.einsum("bhqd,bhcd->bhqc", q_mean, k_mean)


def chunks_to_add(chunks: int, top_k: int, density: float | None) -> int:
    """Chunks each query block adds to its own: ``top_k``, or with a ``density`` the number that makes
    about that share of the layer's ``chunks`` (own chunk included)."""
    if density is None:
        return top_k
    return max(1, round(density * chunks)) - 1


def select_chunks(scores: torch.Tensor, own: torch.Tensor, selection: Selection, top_k: int, tau: float) -> torch.Tensor:
    """(B, H, Qb, C) bool from scores (B, H, Qb, C) and each query block's own chunks ``own`` (Qb, C)."""
    B, H, Qb, C = scores.shape
    own = own.to(scores.device).expand(B, H, Qb, C)
    rest = scores.masked_fill(own, float("-inf"))
    chosen = torch.zeros(B, H, Qb, C, dtype=torch.bool, device=scores.device)
    if selection is Selection.TOPK:
        k = min(top_k, C)
        if k:
            idx = rest.topk(k, dim=-1).indices
            chosen.scatter_(-1, idx, True)
    elif selection is Selection.GLOBAL:
        k = min(top_k * Qb, Qb * C)
        if k:
            idx = rest.flatten(2).topk(k, dim=-1).indices
            chosen.view(B, H, -1).scatter_(-1, idx, True)
    else:
        flat = scores.flatten(2)
        low, high = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
        norm = (flat - low) / (high - low).clamp_min(1e-12)  # min-max per head
        order = torch.argsort(norm, dim=-1, descending=True, stable=True)
        ranked = norm.gather(-1, order)
        cum = ranked.cumsum(-1)
        need = tau * ranked.sum(-1, keepdim=True)
        keep = (cum - ranked) < need  # pairs until the cumulative share reaches tau
        chosen.view(B, H, -1).scatter_(-1, order, keep)
    chosen &= torch.isfinite(rest) | own  # never pick -inf filler over own chunks
    return chosen | own


class VMoBA(SparseAttentionRuntime):
    """Runtime of one VMoBA patch; partitions are cached per (geometry, mode)."""

    method = "vmoba"

    def __init__(self, ctx: PatchContext, config: VMoBAConfig) -> None:
        self.config = config
        self._partitions: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.training = config.training
        super().__init__(ctx, config.block_size, config.backend.value)

    def partition(self, geometry: SequenceGeometry, mode: Partition
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(perm, chunk_of, membership (C, nb), own (Qb, C))`` for a geometry and partition mode."""
        key = (geometry, mode)
        if key not in self._partitions:
            ids_mode, shape = chunk_shape(geometry, mode, self.config.chunk_tokens)
            perm, chunk_of = partition_permutation(geometry, ids_mode, shape)
            member = chunk_membership(chunk_of, self.block_size)
            self._partitions[key] = (perm, chunk_of, member, member.T.clone())
        return self._partitions[key]

    @torch.no_grad()  # the selection is discrete: no gradient flows through the chunk scores
    def select(self, call: AttentionCall) -> Plan | Dense:
        if self.adapter.is_denoiser and not self.training and call.before(self.config.warmup):
            return Dense("warm-up")
        mode = PARTITIONS[call.layer.index % 3]
        geometry = call.geometry
        if geometry.visual_tokens <= self.block_size:
            return Dense("one chunk")
        perm, chunk_of, member, own = self.partition(geometry, mode)
        if member.shape[0] < 2:
            return Dense("one chunk")
        q = call.q.index_select(2, perm.to(call.q.device))
        k = call.k.index_select(2, perm.to(call.k.device))
        key_mask = None if call.key_mask is None else call.key_mask.index_select(1, perm.to(call.q.device))
        scores = chunk_scores(q, k, chunk_of, self.block_size, key_mask)
        top_k = chunks_to_add(member.shape[0], self.config.top_k, self.config.density)
        chosen = select_chunks(scores, own, self.config.selection, top_k, self.config.tau)
        table = (chosen.float() @ member.float().to(chosen.device)) > 0  # (B, H, Qb, nb)
        return Plan(table, perm, note=mode.value, permuted_qk=(q, k))


@register_method(VMoBAConfig, name="vmoba", stage=Stage.ATTENTION,
                 summary="VMoBA: 1D/2D/3D chunked mixture-of-block attention, dense warm-up; trainable")
def _apply(ctx: PatchContext, config: VMoBAConfig) -> VMoBA:
    return VMoBA(ctx, config)
