"""What AdaSpa and VMoBA share: hooking self-attention modules, dense fallbacks, running the selected
mask on a backend (with a token permutation when the method asks for one) and reporting density.

A method subclasses :class:`SparseAttentionRuntime` and implements :meth:`select`, which gets an
:class:`AttentionCall` (layer, step, q/k/v, token geometry) and returns a :class:`Plan` (a (B, H, Qb, Kb)
bool block table over the possibly permuted sequence), ``None`` (or a reason string) for dense attention, or a
:class:`Computed` output (a dense step the method already ran, e.g. a search fused with attention). The runtime
forces the rows and columns of special tokens (joint text, class tokens) on, so they are never dropped.
Cross-attention modules are never hooked; a self-attention call whose queries and keys differ in length
runs dense.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from accel.adapters.base import TokenLayout
from accel.attention.backends import sparse_attention
from accel.attention.dispatcher import try_register_diffusers_backend
from accel.attention.format import BlockSparseMask
from accel.attention.intercept import SparseAttentionHook, original_sdpa
from accel.attention.tokens import SequenceGeometry, inverse_permutation
from accel.contract import PatchContext
from accel.errors import UnsupportedModelError
from accel.hooks import CallbackHook
from accel.parallel import context_parallel_config

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerInfo:
    """One hooked self-attention module: its position in execution order and its block's name."""

    index: int
    name: str


@dataclass
class AttentionCall:
    """One self-attention call as the method sees it; tensors are (B, H, S, D)."""

    layer: LayerInfo
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    geometry: SequenceGeometry
    step: int
    num_steps: int | None
    branch: int
    key_mask: torch.Tensor | None
    block_size: int
    progress: float | None = None  # fraction of the schedule done (accel.steps.StepState.progress)

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.q.shape[2] / self.block_size)

    def before(self, fraction: float) -> bool:
        """Whether this step comes before ``fraction`` of the schedule: by step index when the count is
        known (``step < round(fraction * num_steps)``), else by the noise level's progress."""
        if self.num_steps is not None:
            return self.step < round(fraction * self.num_steps)
        return self.progress is not None and self.progress < fraction - 1e-9


# A plan listing every block is dense attention: it runs as SDPA, which is faster than any block-sparse
# kernel walking a full list, with the same result.
DENSE_ABOVE = 1.0


@dataclass
class Plan:
    """A method's decision: attend ``table`` (B, H, Qb, Kb) over the sequence reordered by ``perm``."""

    table: torch.Tensor
    perm: torch.Tensor | None = None
    note: str = ""
    # q and k already reordered by ``perm`` (the method scored blocks on them): the runtime reuses them
    # instead of permuting the 17K-token tensors a second time.
    permuted_qk: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass(frozen=True)
class Dense:
    """A method's decision to run this call as dense attention; ``reason`` is logged for the step
    (``"warm-up"``, ``"search"``...)."""

    reason: str = "dense step"


@dataclass
class Computed:
    """A call the method has already answered with dense attention (``output`` (B, H, S, D)); ``reason``
    is logged as for a dense step."""

    output: torch.Tensor
    reason: str


@dataclass
class _BuiltMask:
    """Index lists built from one plan, valid while the method hands the same table and order again."""

    table: torch.Tensor
    perm: torch.Tensor | None
    geometry: SequenceGeometry
    shape: torch.Size
    mask: BlockSparseMask
    density: float

    def matches(self, plan: Plan, call: AttentionCall) -> bool:
        return (plan.table is self.table and plan.perm is self.perm and call.geometry == self.geometry
                and call.q.shape == self.shape)


@dataclass
class _Record:
    step: int
    branch: int
    layer: str
    density: float
    backend: str


@dataclass
class _Stats:
    records: list[_Record] = field(default_factory=list)
    backends: Counter = field(default_factory=Counter)
    work: float = 0.0  # attended token pairs
    total: float = 0.0  # token pairs of dense attention
    missed: Counter = field(default_factory=Counter)  # forwards per layer that never reached SDPA


class SparseAttentionRuntime:
    """Hooks every self-attention module the adapter exposes and routes its SDPA call through
    :meth:`select` and a backend."""

    method = "sparse-attention"
    training = False  # True: every forward selects, no steps to place (VMoBAConfig(training=True))

    def __init__(self, ctx: PatchContext, block_size: int, backend: str) -> None:
        self.tracker = ctx.tracker
        self.adapter = ctx.adapter
        self.block_size = block_size
        self.backend = backend
        self.stats = _Stats()
        self.last_masks: dict[tuple[str, int], BlockSparseMask] = {}
        self._built: dict[tuple[str, int], _BuiltMask] = {}
        self._layout: TokenLayout | None = None
        self._warned: set[str] = set()
        self.layers: list[LayerInfo] = []
        self._hooks: list[SparseAttentionHook] = []
        self.steps_by: str | None = None  # what placed the warm-up and searches (report)
        self.model = ctx.model
        check_parallelism(self.method, ctx.model)
        self._attach(ctx)
        ctx.tracker.on_reset(self.reset)

    # -- attaching -------------------------------------------------------------------------------------
    def _attach(self, ctx: PatchContext) -> None:
        modules = []
        for block in ctx.adapter.blocks():
            for role, module in (("self_attn", block.self_attn), ("self_attn2", block.extra.get("self_attn2"))):
                if module is not None:
                    modules.append((f"{block.name}.{role}" if role != "self_attn" else block.name, module))
        if not modules:
            raise ValueError(f"{self.method}: {type(ctx.model).__name__} exposes no self-attention modules.")
        for index, (name, module) in enumerate(modules):
            info = LayerInfo(index, name)
            self.layers.append(info)
            if "fused_attn" in module.__dict__:  # timm: the fused path is the one that calls SDPA
                ctx.hooks.set_attr(module, "fused_attn", True)
            handler = functools.partial(self._handle, info)
            hook = SparseAttentionHook(handler, on_miss=functools.partial(self._missed, info))
            ctx.hooks.add_hook(module, hook, f"attn.{name}")
            self._hooks.append(hook)
        if any(hasattr(getattr(m, "processor", None), "_attention_backend") for _, m in modules):
            try_register_diffusers_backend()  # dispatcher models can then pick set_attention_backend("accel")
        if not ctx.adapter.is_denoiser:  # the step tracker only reads layouts of denoisers
            def before(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
                self._layout = ctx.adapter.token_layout(args, kwargs)

            ctx.hooks.add_hook(ctx.model, CallbackHook(before=before), "layout")

    def _missed(self, info: LayerInfo, module: torch.nn.Module) -> None:
        """An attention forward that never called SDPA: say so once, in words the user can act on."""
        self.stats.missed[info.name] += 1
        if "missed" in self._warned:
            return
        self._warned.add("missed")
        backend = getattr(getattr(module, "processor", None), "_attention_backend", None)
        warnings.warn(
            f"{self.method}: attention in {info.name} ({type(module).__name__}) ran without calling "
            "torch.nn.functional.scaled_dot_product_attention"
            + (f" (its diffusers attention backend is {backend!r})" if backend else "")
            + ", so it stayed dense. Use diffusers' 'accel' attention backend "
            "(model.set_attention_backend('accel')) or its 'native' one (model.reset_attention_backend()), "
            "and the default attention processor.",
            stacklevel=2,
        )

    def reset(self) -> None:
        """A new sequence: drop per-sequence logs and every cache."""
        check_parallelism(self.method, self.model)  # enable_parallelism may have run after the patch
        self.stats.records.clear()
        self.drop_caches()

    def drop_caches(self) -> None:
        """Forget masks and patterns kept for later calls (subclasses drop their own caches too)."""
        self.last_masks.clear()
        self._built.clear()

    # -- one call --------------------------------------------------------------------------------------
    def _dense(self, call_args: tuple, call_kwargs: dict, record: tuple[LayerInfo, int, int] | None,
               reason: str) -> torch.Tensor:
        if record is not None:
            info, step, branch = record
            self._log(step, branch, info.name, 1.0, f"dense ({reason})", call_args[0], call_args[1])
        return original_sdpa()(*call_args, **call_kwargs)

    def _handle(self, info: LayerInfo, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
        args = (query, key, value)
        kwargs = {"attn_mask": attn_mask, "dropout_p": dropout_p, "is_causal": is_causal, "scale": scale,
                  "enable_gqa": enable_gqa}
        if query.shape[2] != key.shape[2] or query.shape[1] != key.shape[1] or query.dim() != 4:
            return self._dense(args, kwargs, None, "not self-attention")  # cross-attention stays dense
        state = self.tracker.state
        record = (info, state.step_index, state.branch)
        if is_causal or (dropout_p > 0 and torch.is_grad_enabled()):
            return self._dense(args, kwargs, record, "causal or dropout")
        ok, key_mask = _key_padding(attn_mask, query.shape[0], key.shape[2])
        if not ok:
            return self._dense(args, kwargs, record, "attention mask")
        S = query.shape[2]
        if S <= self.block_size:
            return self._dense(args, kwargs, record, "one block")
        layout = state.layout if self.adapter.is_denoiser else self._layout
        num_steps = state.num_steps
        if self.adapter.is_denoiser and not self.training and num_steps is None and state.progress is None:
            raise RuntimeError(
                f"{self.method} needs the step count or the timesteps to place its dense warm-up and searches: "
                "this model's forward passes no timestep. Call patch.reset(num_steps=N) before a hand-written "
                "loop."
            )
        if self.adapter.is_denoiser and not self.training:
            self.steps_by = state.progress_by
        scale_value = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
        call = AttentionCall(info, query, key, value, scale_value, SequenceGeometry.from_layout(layout, S),
                             state.step_index, num_steps, state.branch, key_mask, self.block_size,
                             state.progress)
        plan = self.select(call)
        if isinstance(plan, Computed):
            self._log(call.step, call.branch, info.name, 1.0, f"dense ({plan.reason})", query, key)
            return plan.output
        if isinstance(plan, Dense):
            return self._dense(args, kwargs, record, plan.reason)
        mask, density = self._mask_for(call, plan, query.device)
        if density >= DENSE_ABOVE:
            return self._dense(args, kwargs, record, "the plan lists every block")
        return self._run(call, plan, mask, density)

    def _run(self, call: AttentionCall, plan: Plan, mask: BlockSparseMask, density: float) -> torch.Tensor:
        q, k, v, key_mask = call.q, call.k, call.v, call.key_mask
        if plan.perm is not None:
            perm = plan.perm.to(q.device)
            # Scored copies were made without autograd: a training call permutes again, with gradients.
            needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
            reuse = plan.permuted_qk if not needs_grad else None
            q, k = reuse or (q.index_select(2, perm), k.index_select(2, perm))
            v = v.index_select(2, perm)
            key_mask = None if key_mask is None else key_mask.index_select(1, perm)
        self.last_masks[(call.layer.name, call.branch)] = mask
        out, used = sparse_attention(q, k, v, mask, scale=call.scale, key_mask=key_mask, backend=self.backend)
        if plan.perm is not None:
            out = out.index_select(2, inverse_permutation(plan.perm).to(out.device))
        self._log(call.step, call.branch, call.layer.name, density, used, call.q, call.k)
        return out

    def _mask_for(self, call: AttentionCall, plan: Plan, device: torch.device) -> tuple[BlockSparseMask, float]:
        """The plan's index lists and density. A plan a method hands again (AdaSpa reuses one pattern
        for many steps) keeps the lists built the first time: no table-to-lists conversion and no host
        sync on the steps in between."""
        key = (call.layer.name, call.branch)
        built = self._built.get(key)
        if built is not None and built.matches(plan, call):
            return built.mask, built.density
        table = plan.table.to(device).clone()
        special = _permuted_special_blocks(call.geometry, plan.perm, self.block_size, device)
        if bool(special.any()):
            table[:, :, :, special] = True  # everyone attends text / class tokens
            table[:, :, special, :] = True  # and they attend everything
        mask = BlockSparseMask.from_dense(table, self.block_size, call.q.shape[2], call.k.shape[2])
        self._built[key] = _BuiltMask(plan.table, plan.perm, call.geometry, call.q.shape, mask, mask.density())
        return mask, self._built[key].density

    def select(self, call: AttentionCall) -> Plan | Computed | Dense:  # pragma: no cover - abstract
        """A :class:`Plan` to run sparse, a :class:`Computed` output, or :class:`Dense` with its reason."""
        raise NotImplementedError

    # -- reporting -------------------------------------------------------------------------------------
    def _log(self, step: int, branch: int, layer: str, density: float, backend: str,
             q: torch.Tensor, k: torch.Tensor) -> None:
        pairs = float(q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2])
        self.stats.records.append(_Record(step, branch, layer, density, backend))
        self.stats.backends[backend.split(" ")[0]] += 1
        self.stats.work += density * pairs
        self.stats.total += pairs

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    def remove(self) -> None:
        """Drop the caches; the run's records stay readable for a report after removal."""
        self.drop_caches()

    def report(self) -> dict[str, Any]:
        """Density (attended fraction of token pairs) overall, per step and per layer, and backends used."""
        per_step: dict[tuple[int, int], list[_Record]] = defaultdict(list)
        per_layer: dict[str, float] = {}
        for rec in self.stats.records:
            per_step[(rec.step, rec.branch)].append(rec)
            per_layer[rec.layer] = round(rec.density, 4)
        rows = []
        for (step, branch), recs in sorted(per_step.items()):
            label = f"step {step:>3}" + (f" branch {branch}" if branch else "")
            backends = ", ".join(sorted({r.backend for r in recs}))
            mean = sum(r.density for r in recs) / len(recs)
            dens = " ".join(f"{r.density:.2f}" for r in recs)
            rows.append(f"{label}: density {mean:.3f} over {len(recs)} layers [{dens}] ({backends})")
        return {
            "density": round(self.stats.work / self.stats.total, 4) if self.stats.total else 1.0,
            "backend": dict(self.stats.backends),
            "attention_path": dict(sum((hook.paths for hook in self._hooks), Counter())),
            **({"not_intercepted": dict(self.stats.missed)} if self.stats.missed else {}),
            "per_step": rows,
            "per_layer": per_layer,
            **({"steps_by": self.steps_by} if self.steps_by else {}),
        }

    def records(self) -> list[_Record]:
        return list(self.stats.records)


def check_parallelism(method: str, model: torch.nn.Module) -> None:
    """Sparse attention composes with Ulysses context parallelism, not with ring attention.

    Ulysses' all-to-all hands each rank the whole sequence for some of the heads before attention runs, so
    block selection sees what it sees in one process (selection is per head). Ring attention gives each rank
    a slice of the keys at a time and merges partial results by their log-sum-exp, through backends that
    never call SDPA: the sparse pattern would silently not apply."""
    cp = context_parallel_config(model)
    if cp is not None and (getattr(cp, "ring_degree", 1) or 1) > 1:
        raise UnsupportedModelError(
            f"{method}: sparse attention does not compose with ring attention (ContextParallelConfig("
            f"ring_degree={cp.ring_degree})): each rank sees a slice of the keys, so a block pattern over the "
            "whole sequence cannot be applied. Use ContextParallelConfig(ulysses_degree=N), with which it "
            "composes, or remove the sparse method."
        )


def _permuted_special_blocks(geometry: SequenceGeometry, perm: torch.Tensor | None, block_size: int,
                             device: torch.device) -> torch.Tensor:
    special = geometry.special_mask(device)
    if perm is not None:
        special = special.index_select(0, perm.to(device))
    nb = math.ceil(geometry.length / block_size)
    special = torch.nn.functional.pad(special, (0, nb * block_size - geometry.length))
    return special.reshape(nb, block_size).any(-1)


def _key_padding(attn_mask: torch.Tensor | None, batch: int, kv_len: int) -> tuple[bool, torch.Tensor | None]:
    """``(supported, key_mask (B, Sk) bool or None)`` for an SDPA ``attn_mask``: only key-padding masks
    ((B, Sk) or (B|1, 1, 1, Sk), bool or 0/-inf additive) run sparse; others fall back to dense."""
    if attn_mask is None:
        return True, None
    m = attn_mask
    if m.dim() == 4 and m.shape[1] == 1 and m.shape[2] == 1:
        m = m[:, 0, 0]
    if m.dim() != 2 or m.shape[1] != kv_len or m.shape[0] not in (1, batch):
        return False, None
    if m.dtype != torch.bool:
        zero, blocked = m == 0, m <= -1e4
        if not bool((zero | blocked).all()):
            return False, None
        m = zero
    m = m.expand(batch, kv_len)
    return True, (None if bool(m.all()) else m.contiguous())
