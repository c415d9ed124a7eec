"""Replace the attention *call* inside one attention module, leaving projections, norms and RoPE alone.

Every attention module accel targets ends in ``torch.nn.functional.scaled_dot_product_attention`` with
(B, H, S, D) tensors: diffusers' ``AttnProcessor2_0`` / ``JointAttnProcessor2_0`` call it directly;
Wan, Flux, HunyuanVideo, LTX call ``dispatch_attention_fn``, whose default ``native`` backend calls it
(and whose ``accel`` backend, ``accel.attention.dispatcher``, calls the handler without the override);
timm's ``Attention`` calls it on its fused path (which the patch turns on for the patched modules).

:class:`SparseAttentionHook` wraps one module's forward. While that forward runs (and only then) the
``torch.nn.functional`` attribute points at a dispatcher that hands the call to the module's handler; a
``ContextVar`` says whose forward is running, so other threads and other modules see plain SDPA. The
override is reference-counted and removed when the last patched forward returns: outside patched
forwards nothing global is changed, and removing the hook (``HookSet.remove``) leaves no trace.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F

from accel.hooks import ModelHook

Handler = Callable[..., torch.Tensor]

_ACTIVE: ContextVar[Handler | None] = ContextVar("accel_sparse_attention", default=None)
_LOCK = threading.Lock()
_installed = 0
_original: Callable[..., torch.Tensor] | None = None


def original_sdpa() -> Callable[..., torch.Tensor]:
    """PyTorch's SDPA even while the override is installed (dense fallbacks call this)."""
    return _original if _original is not None else F.scaled_dot_product_attention


def route_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                    scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """One (B, H, S, D) attention call: to the handler of the patched forward now running, else to SDPA.
    The SDPA override and the diffusers ``accel`` backend (``accel.attention.dispatcher``) both end here."""
    handler = _ACTIVE.get()
    sdpa = original_sdpa()
    if handler is None:
        return sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                    scale=scale, enable_gqa=enable_gqa)
    token = _ACTIVE.set(None)  # SDPA calls made by the handler itself are plain
    try:
        return handler(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                       scale=scale, enable_gqa=enable_gqa)
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def _sdpa_override() -> Iterator[None]:
    global _installed, _original
    with _LOCK:
        if _installed == 0:
            _original = F.scaled_dot_product_attention
            F.scaled_dot_product_attention = route_attention
        _installed += 1
    try:
        yield
    finally:
        with _LOCK:
            _installed -= 1
            if _installed == 0:
                F.scaled_dot_product_attention = _original
                _original = None


def override_installed() -> bool:
    """Whether the SDPA override is in place right now (False outside patched forwards)."""
    return _installed > 0


#: How a patched forward's attention reached its handler (``SparseAttentionHook.paths``).
DISPATCHER_PATH = "diffusers-dispatcher"
INTERCEPT_PATH = "sdpa-intercept"


class SparseAttentionHook(ModelHook):
    """Routes the SDPA call(s) inside one module's forward to ``handler(q, k, v, attn_mask=..., ...)``.

    A module on diffusers' ``accel`` attention backend reaches the handler through the dispatcher
    (``accel.attention.dispatcher``) and runs without the SDPA override; any other module runs with it.
    ``paths`` counts the forwards per path.

    ``on_miss(module)`` runs when a forward finishes without reaching SDPA at all: the module computes
    attention some other way (a diffusers attention backend other than ``native``, a custom processor),
    so nothing was made sparse and the user must hear it rather than see a dense-speed "sparse" run.
    """

    def __init__(self, handler: Handler, on_miss: Callable[[torch.nn.Module], None] | None = None) -> None:
        super().__init__()
        self.handler = handler
        self.on_miss = on_miss
        self.calls = 0
        self.missed = 0
        self.paths: Counter = Counter()
        # Compiler-disabled (here, not at import: that would import dynamo): block selection is data-dependent
        # Python (searches, top-k lists, a ContextVar); under torch.compile the attention module runs eagerly
        # between compiled pieces instead of breaking the graph at every step of the selection.
        self.new_forward = torch.compiler.disable(self.new_forward)

    def _handle(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls += 1
        return self.handler(*args, **kwargs)

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        from accel.attention.dispatcher import uses_accel_backend

        before = self.calls
        dispatched = uses_accel_backend(module)
        token = _ACTIVE.set(self._handle)
        try:
            with contextlib.nullcontext() if dispatched else _sdpa_override():
                output = self.fn_ref.original_forward(*args, **kwargs)
        finally:
            _ACTIVE.reset(token)
        if self.calls > before:
            self.paths[DISPATCHER_PATH if dispatched else INTERCEPT_PATH] += 1
        else:
            self.missed += 1
            if self.on_miss is not None:
                self.on_miss(module)
        return output
