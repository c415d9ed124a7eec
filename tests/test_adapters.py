"""Every model-family adapter against a tiny real model: block order, token layout, block I/O, exact
identity patching and removal, step tracking, and the error for unknown models."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import accel
from accel.adapters.base import BlockInfo, TokenLayout
from accel.hooks import accel_hook_names
from families import FAMILIES, Family, forward_kwargs, run_loop

ALL = list(FAMILIES.values())
DENOISERS = [f for f in ALL if f.is_denoiser]


pytestmark = pytest.mark.usefixtures("one_thread")


def _ids(family: Family) -> str:
    return family.name


def _is_submodule(parent: torch.nn.Module, child: torch.nn.Module) -> bool:
    return any(m is child for m in parent.modules())


def _forward(model: torch.nn.Module, kwargs: dict[str, Any]) -> Any:
    with torch.no_grad():
        return model(**kwargs)


@pytest.mark.parametrize("family", ALL, ids=_ids)
def test_find_adapter_blocks_in_execution_order(family: Family):
    model = family.build()
    adapter = accel.find_adapter(model)
    assert type(adapter).__name__ == family.adapter
    assert adapter.is_denoiser == family.is_denoiser and adapter.sample_arg == family.sample_arg
    blocks = adapter.blocks()
    assert blocks and [b.index for b in blocks] == list(range(len(blocks)))
    for block in blocks:
        assert model.get_submodule(block.name) is block.module
        assert block.branches() and "self_attn" in block.branches()
        for kind, branch in block.branches().items():
            assert branch is not block.module and _is_submodule(block.module, branch), (block.name, kind)

    order: list[int] = []
    handles = [b.module.register_forward_pre_hook(lambda m, a, i=b.index: order.append(i)) for b in blocks]
    _forward(model, forward_kwargs(family, batch=1, size=family.sizes[0], frames=family.frames[0]))
    for handle in handles:
        handle.remove()
    assert order == list(range(len(blocks)))


def _attention_tokens(family: Family, args: tuple, kwargs: dict[str, Any]) -> int:
    """Tokens in the attention sequence: image (+ joint text) for diffusers, ``x.shape[1]`` for timm."""
    if not family.is_denoiser:
        return int((args[0] if args else kwargs["x"]).shape[1])
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    return int(hidden.shape[1]) + (int(context.shape[1]) if context is not None else 0)


@pytest.mark.parametrize("family", ALL, ids=_ids)
def test_token_layout_matches_attention_sequence(family: Family):
    model = family.build()
    adapter = accel.find_adapter(model)
    blocks = adapter.blocks()
    for size, frames in zip(family.sizes, family.frames):
        kwargs = forward_kwargs(family, batch=2, size=size, frames=frames)
        layout = adapter.token_layout((), kwargs)
        assert layout.frames == frames // family.frame_patch
        seen: dict[int, list[int]] = {}
        grids: dict[int, tuple[int, int]] = {}

        def record(block: BlockInfo):
            def hook(module: torch.nn.Module, args: tuple, kw: dict[str, Any]) -> None:
                seen.setdefault(block.index, []).append(_attention_tokens(family, args, kw))

            return hook

        handles = [b.self_attn.register_forward_pre_hook(record(b), with_kwargs=True) for b in blocks]
        if family.name == "timm_swin":  # blocks see (B, H, W, C): the stage grid
            handles += [b.module.register_forward_pre_hook(
                lambda m, a, i=b.index: grids.__setitem__(i, tuple(a[0].shape[1:3]))) for b in blocks]
        _forward(model, kwargs)
        for handle in handles:
            handle.remove()

        for block in blocks:
            expected = adapter.block_layout(block, layout)
            if family.name == "timm_swin":
                window = block.extra["window_size"]
                assert grids[block.index] == (expected.height, expected.width), block.name
                assert seen[block.index] == [window[0] * window[1]], block.name
                continue
            assert seen[block.index] == [expected.self_attention_tokens], (block.name, layout)
            assert layout.layout_for_tokens(seen[block.index][0]) == expected


def _first_block_attention_values(model: torch.nn.Module, kwargs: dict[str, Any],
                                  monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    """The values (B, H, S, D) that SDPA receives inside the first block's self-attention (text encoders
    such as HunyuanVideo's token refiner run attention before it)."""
    attention = accel.find_adapter(model).blocks()[0].self_attn
    inside: list[bool] = []
    captured: list[torch.Tensor] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kw: Any) -> Any:
        if inside:
            captured.append(value)
        return sdpa(query, key, value, *args, **kw)

    handles = [attention.register_forward_pre_hook(lambda m, a: inside.append(True)),
               attention.register_forward_hook(lambda m, a, o: inside.clear())]
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    _forward(model, kwargs)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    for handle in handles:
        handle.remove()
    return captured[0]


@pytest.mark.parametrize("family", [f for f in DENOISERS if f.name != "dit"], ids=_ids)
def test_text_position_is_where_attention_puts_text(family: Family, monkeypatch: pytest.MonkeyPatch):
    """Change only the prompt: the first block's attention rows that change are the joint text tokens."""
    model = family.build()
    kwargs = forward_kwargs(family, batch=1, size=family.sizes[0], frames=family.frames[0])
    layout = accel.find_adapter(model).token_layout((), kwargs)
    other = dict(kwargs, encoder_hidden_states=torch.randn_like(kwargs["encoder_hidden_states"]))
    before = _first_block_attention_values(model, kwargs, monkeypatch)  # (B, H, S, D)
    after = _first_block_attention_values(model, other, monkeypatch)
    changed = (before != after).any(-1).any(1)[0]  # (S,)
    text = layout.text_tokens
    assert changed.numel() == layout.self_attention_tokens
    expected = torch.zeros_like(changed)
    if layout.text_position == "prefix":
        expected[:text] = True
    elif layout.text_position == "suffix":
        expected[-text:] = True
    assert torch.equal(changed, expected), (layout.text_position, changed.nonzero().flatten().tolist())


def test_layout_for_tokens_levels_and_errors():
    layout = TokenLayout(frames=1, height=12, width=10)
    assert layout.layout_for_tokens(120) is layout
    assert layout.layout_for_tokens(30) == TokenLayout(frames=1, height=6, width=5)
    assert layout.layout_for_tokens(9) == TokenLayout(frames=1, height=3, width=3)  # 5 -> 3: rounds up
    joint = TokenLayout(frames=2, height=4, width=4, text_tokens=7, text_position="suffix")
    assert joint.layout_for_tokens(2 * 2 * 2 + 7).height == 2
    with pytest.raises(ValueError, match="No downsampling level .* has 50 tokens"):
        layout.layout_for_tokens(50)
    with pytest.raises(ValueError, match="factor >= 1, got 0"):
        layout.downsampled(0)


@pytest.mark.parametrize("family", ALL, ids=_ids)
def test_block_io_round_trip(family: Family):
    model = family.build()
    blocks = accel.find_adapter(model).blocks()
    calls: dict[int, tuple] = {}

    def record(block: BlockInfo):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
            calls[block.index] = (args, kwargs, output)

        return hook

    handles = [b.module.register_forward_hook(record(b), with_kwargs=True) for b in blocks]
    _forward(model, forward_kwargs(family, batch=2, size=family.sizes[1], frames=family.frames[1]))
    for handle in handles:
        handle.remove()

    for block in blocks:
        args, kwargs, output = calls[block.index]
        inputs = block.io.read_inputs(args, kwargs)
        assert set(inputs) == {s.name for s in block.io.inputs}
        assert all(isinstance(v, torch.Tensor) for v in inputs.values()), block.name
        outputs = block.io.read_outputs(output)
        rebuilt = block.io.make_output(outputs)
        if isinstance(output, tuple):
            assert isinstance(rebuilt, tuple) and len(rebuilt) == len(output)
            assert all(a is b for a, b in zip(rebuilt, output))
        else:
            assert rebuilt is output
        for name, value in outputs.items():  # residual blocks keep each stream's shape
            if value is not None and name in inputs:
                assert value.shape == inputs[name].shape, (block.name, name)
    if family.name == "sd3":  # the last MM-DiT block only feeds the image stream
        assert block.io.read_outputs(calls[blocks[-1].index][2])["context"] is None


def _snapshot(model: torch.nn.Module) -> tuple[dict[str, list[str]], dict[str, torch.Tensor]]:
    keys = {name: sorted(m.__dict__) for name, m in model.named_modules()}
    return keys, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", ALL, ids=_ids)
def test_identity_patch_is_exact_and_removal_restores(family: Family, identity_method):
    model = family.build()
    baseline = run_loop(model, family, steps=2)
    keys, state = _snapshot(model)
    patch = accel.patch(model, "identity")
    assert accel_hook_names(model)
    assert torch.equal(run_loop(model, family, steps=2), baseline)
    calls = patch.handle("identity").calls
    forwards = 2 if family.is_denoiser else 1
    for block in patch.adapter.blocks():
        assert calls[block.name] == forwards, block.name
        for kind in block.branches():
            assert calls[f"{block.name}.{kind}"] >= forwards, (block.name, kind)

    patch.remove()
    assert torch.equal(run_loop(model, family, steps=2), baseline)
    after_keys, after_state = _snapshot(model)
    assert after_keys == keys
    assert after_state.keys() == state.keys()
    assert all(torch.equal(after_state[k], v) for k, v in state.items())
    assert not any("_diffusers_hook" in m.__dict__ for m in model.modules())
    assert accel_hook_names(model) == []


@pytest.mark.parametrize("family", DENOISERS, ids=_ids)
def test_step_tracking_across_loops_and_cfg(family: Family, identity_method):
    model = family.build()
    (s0, s1), (f0, f1) = family.sizes, family.frames
    with accel.patch(model, "identity") as patch:
        steps = patch.handle("identity").steps
        run_loop(model, family, steps=3, batch=1, size=s0, frames=f0)
        assert steps == [(0, 0), (1, 0), (2, 0)]
        # Fewer steps, another size, frame count and batch: a new sequence from step 0.
        run_loop(model, family, steps=2, batch=2, size=s1, frames=f1)
        assert steps[3:] == [(0, 0), (1, 0)]
        state = patch.tracker.state
        assert state.batch_size == 2 and state.layout == patch.adapter.token_layout(
            (), forward_kwargs(family, batch=2, size=s1, frames=f1))
        run_loop(model, family, steps=2, batch=1, size=s0, frames=f0, cfg="separate")
        assert steps[5:] == [(0, 0), (0, 1), (1, 0), (1, 1)]
        run_loop(model, family, steps=2, batch=1, size=s0, frames=f0, cfg="batched")
        assert steps[9:] == [(0, 0), (1, 0)]


class CustomNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(2, 2)


class VisionTransformer(torch.nn.Module):
    """Same name as timm's class, from another library (torchvision has one)."""


@pytest.mark.parametrize("model", [torch.nn.Linear(2, 2), CustomNet()], ids=["linear", "custom"])
def test_unknown_model_lists_supported(model: torch.nn.Module, identity_method):
    name = type(model).__name__
    message = rf"No accel adapter for {name}\. Supported: .*FluxTransformer2DModel.*WanTransformer3DModel"
    with pytest.raises(accel.UnsupportedModelError, match=message):
        accel.find_adapter(model)
    with pytest.raises(accel.UnsupportedModelError, match="register_adapter"):
        accel.patch(model, "identity")


def test_same_named_class_from_another_library_is_refused():
    with pytest.raises(accel.UnsupportedModelError, match="is not timm's VisionTransformer"):
        accel.find_adapter(VisionTransformer())
