"""Running a half-precision model in float32 for a while, without changing what it stores.

Calibration measures small differences between a model's features at nearby steps. In bf16 the
arithmetic's own error is of the same order as those differences (RESULTS, "digits-pixart in bf16"), so
accel's calibration calls compute in float32 and the schedules they produce do not depend on the dtype the
model is stored in. The weights stay in their own dtype between module calls: each module that holds half
precision tensors sees float32 copies only while its own forward runs, so the model never holds two copies
at once and everything that reads ``model.dtype`` (pipelines size their latents by it) sees it unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils import _pytree as pytree

HALF_DTYPES = (torch.float16, torch.bfloat16)


def half_precision(module: torch.nn.Module) -> bool:
    """Whether any floating parameter or buffer of ``module`` is float16/bfloat16."""
    tensors = [*module.parameters(), *module.buffers()]
    return any(t.dtype in HALF_DTYPES for t in tensors)


@contextlib.contextmanager
def computed_in_fp32(model: torch.nn.Module) -> Iterator[bool]:
    """Inside the block, ``model`` computes in float32 and returns its outputs in the dtype of its first
    floating input (what the caller would have got back). Yields whether anything was upcast (False
    for a model with no half precision tensors, which is left alone). Runs eagerly under
    ``torch.compile``: swapping a module's tensors mid-graph would only cost recompiles.

    Exact on exit: bf16 and fp16 values convert to float32 and back without change, and the original
    tensor objects are put back, not copies.
    """
    owners = [m for m in model.modules() if _own_half_tensors(m)]
    if not owners:
        yield False
        return
    handles: list[Any] = []
    caller_dtype: list[torch.dtype] = []
    try:
        for module in owners:
            saved: dict[str, Any] = {}
            handles.append(module.register_forward_pre_hook(_upcast(saved), with_kwargs=True, prepend=True))
            handles.append(module.register_forward_hook(_restore(saved), always_call=True))
        # registered last with prepend, so it runs first: it must see the caller's dtype, not the upcast
        handles.append(model.register_forward_pre_hook(_remember_dtype(caller_dtype), with_kwargs=True,
                                                       prepend=True))
        handles.append(model.register_forward_hook(_return_in(caller_dtype), always_call=True))
        with torch.compiler.set_stance("force_eager"):
            yield True
    finally:
        for handle in handles:
            handle.remove()


def _own_half_tensors(module: torch.nn.Module) -> bool:
    return any(t is not None and t.dtype in HALF_DTYPES
               for t in (*module._parameters.values(), *module._buffers.values()))


def _to_fp32(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dtype in HALF_DTYPES:
        return value.float()
    return value


def _first_floating_dtype(args: tuple, kwargs: dict) -> torch.dtype | None:
    for leaf in pytree.tree_leaves((args, kwargs)):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return leaf.dtype
    return None


def _remember_dtype(store: list[torch.dtype]) -> Any:
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        store.append(_first_floating_dtype(args, kwargs) or torch.float32)
    return hook


def _return_in(store: list[torch.dtype]) -> Any:
    def hook(module: torch.nn.Module, args: tuple, output: Any) -> Any:
        dtype = store.pop() if store else torch.float32

        def cast(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and value.dtype == torch.float32 and dtype in HALF_DTYPES:
                return value.to(dtype)
            return value
        return pytree.tree_map(cast, output)
    return hook


def _upcast(saved: dict[str, Any]) -> Any:
    """Float32 copies of the module's own half tensors for its forward, and its half inputs in float32
    (a parent may have cast them to this module's stored dtype before calling it)."""
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is not None and tensor.dtype in HALF_DTYPES:
                    saved[f"{id(store)}:{name}"] = (store, name, tensor)
                    upcast = tensor.detach().float()
                    store[name] = torch.nn.Parameter(upcast, requires_grad=False) \
                        if isinstance(tensor, torch.nn.Parameter) else upcast
        return pytree.tree_map(_to_fp32, args), pytree.tree_map(_to_fp32, kwargs)
    return hook


def _restore(saved: dict[str, Any]) -> Any:
    def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
        for store, name, tensor in saved.values():
            store[name] = tensor
        saved.clear()
    return hook
