"""accel's sparse attention as a diffusers attention backend named ``"accel"``.

diffusers' models that call ``dispatch_attention_fn`` (Wan, Flux, HunyuanVideo, LTX, ...) pick their attention
with ``model.set_attention_backend(name)`` or ``with attention_backend(name):``. Registered here, the
``accel`` backend hands each call to the sparse-attention runtime of the module whose forward is running
(the same handler the SDPA interception uses), and to PyTorch's SDPA when no accel patch is attached. A
module whose attention goes through this backend runs without the process-wide SDPA override: the override
stays the fallback for models that call SDPA directly (timm, diffusers' ``AttnProcessor2_0``).

::

    patch = accel.patch(pipe, "adaspa")               # registers the backend when diffusers is installed
    pipe.transformer.set_attention_backend("accel")   # or: with attention_backend("accel"): pipe(...)
    patch.report().methods["adaspa"]["attention_path"]  # {'diffusers-dispatcher': n}

diffusers' backend names are a closed ``Enum`` (``AttentionBackendName``); registration adds one member to
it through the ``Enum``'s own lookup tables, checked on the way, and says clearly if a diffusers release
changes them. Context parallelism is not offered: a ``parallel_config`` call gets a clear error.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from accel.attention.intercept import route_attention

#: The backend's name in diffusers (``set_attention_backend("accel")``).
BACKEND = "accel"
_LOCK = threading.Lock()


def _backend_enum() -> Any:
    from diffusers.models.attention_dispatch import AttentionBackendName

    return AttentionBackendName


def _add_member(enum_cls: Any, name: str, value: str) -> Any:
    """One more member of a ``str``-valued ``Enum``, visible to ``enum_cls(value)`` and ``__members__``."""
    for table in ("_member_map_", "_value2member_map_", "_member_names_"):
        if not hasattr(enum_cls, table):
            raise RuntimeError(
                f"accel cannot add the {value!r} attention backend: diffusers' AttentionBackendName has no "
                f"{table} (a Python or diffusers change). Use the default SDPA interception instead "
                "(leave the model on the 'native' backend)."
            )
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    member.__init__(value)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    return member


def register_diffusers_backend() -> str:
    """Make ``"accel"`` a diffusers attention backend (idempotent); returns the name. Raises ImportError
    without diffusers."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    with _LOCK:
        names = _backend_enum()
        member = names._value2member_map_.get(BACKEND) or _add_member(names, BACKEND.upper(), BACKEND)
        if member not in _AttentionBackendRegistry._backends:
            _AttentionBackendRegistry.register(member, constraints=[])(_accel_attention)
    return BACKEND


def try_register_diffusers_backend() -> bool:
    """:func:`register_diffusers_backend` where diffusers is installed; False (nothing done) elsewhere."""
    try:
        register_diffusers_backend()
    except ImportError:
        return False
    return True


def uses_accel_backend(module: torch.nn.Module) -> bool:
    """Whether ``module``'s attention goes through diffusers' dispatcher to the ``accel`` backend: its
    processor names it, or names none while ``accel`` is the active backend (``attention_backend(...)``)."""
    processor = getattr(module, "processor", None)
    if processor is None or not hasattr(processor, "_attention_backend"):
        return False  # an attention processor that does not dispatch (it calls SDPA itself)
    backend = processor._attention_backend
    if backend is None:
        try:
            from diffusers.models.attention_dispatch import _AttentionBackendRegistry
        except ImportError:
            return False
        backend = _AttentionBackendRegistry._active_backend
    return getattr(backend, "value", backend) == BACKEND


def _accel_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    _parallel_config: Any = None,
) -> torch.Tensor:
    """diffusers' backend contract: (B, S, H, D) in and out; the runtime works on (B, H, S, D)."""
    if return_lse:
        raise ValueError("The 'accel' attention backend does not return the log-sum-exp (return_lse=True); "
                         "use the 'native' backend for that call.")
    if _parallel_config is not None:
        raise ValueError("The 'accel' attention backend does not support context parallelism; use a backend "
                         "that does (model.set_attention_backend('native')) with enable_parallelism.")
    if attn_mask is not None and attn_mask.ndim == 2 and attn_mask.shape == (query.shape[0], key.shape[1]):
        attn_mask = attn_mask[:, None, None, :]  # (B, Sk) key mask, as diffusers' native backend takes it
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    out = route_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                          enable_gqa=enable_gqa)
    return out.transpose(1, 2)
