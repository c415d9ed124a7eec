"""accel on bf16 pipelines, as users load them: every method runs and is removed exactly, and calibration
computes in float32 without changing what the model stores.

The pipelines are the tiny random-init real ones (``tiny_pipelines``) cast to bf16; quality against fp32
is measured on the embedded models (benchmarks/RESULTS.md, the bf16 tables), not here.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_pipelines import build_pipeline, call_kwargs

import accel
import accel.registry
from accel.precision import computed_in_fp32, half_precision

pytestmark = pytest.mark.usefixtures("one_thread")

VIDEO = {"wan"}


def _half_pipeline(family: str, dtype: torch.dtype = torch.bfloat16):
    pipe = build_pipeline(family)
    pipe.to(dtype)
    return pipe


def _run(pipe, family: str, steps: int = 4, seed: int = 0) -> torch.Tensor:
    kwargs = {**call_kwargs(family), "num_inference_steps": steps,
              "generator": torch.Generator().manual_seed(seed)}
    out = pipe(**kwargs)
    return (out.frames if hasattr(out, "frames") else out.images).float()


def _snapshot(module: torch.nn.Module) -> dict[str, tuple[int, torch.dtype, torch.Tensor]]:
    tensors = module.state_dict(keep_vars=True)
    return {name: (id(t), t.dtype, t.detach().clone()) for name, t in tensors.items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k][:2] == b[k][:2] and torch.equal(a[k][2], b[k][2]) for k in a)


def _pixart_inputs(model: torch.nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, dict]:
    gen = torch.Generator().manual_seed(0)
    config = model.config
    x = torch.randn(2, config.in_channels, config.sample_size, config.sample_size, generator=gen)
    text = torch.randn(2, 5, config.caption_channels, generator=gen)
    kwargs = {"encoder_hidden_states": text.to(dtype), "timestep": torch.tensor([500, 500]),
              "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}, "return_dict": False}
    return x.to(dtype), kwargs


def test_computed_in_fp32_is_exact_and_invisible():
    """Inside the context a bf16 model computes in fp32 (closer to the fp32 model with the same weights than
    its own bf16 forward), returns bf16, and reports bf16 as its dtype (pipelines size their latents by
    it); afterwards it holds the same tensor objects with the same values, and no hooks."""
    model = _half_pipeline("pixart").transformer
    exact = build_pipeline("pixart").transformer
    targets = {**dict(exact.named_parameters()), **dict(exact.named_buffers())}  # non-persistent ones too
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        targets[name].data.copy_(tensor.float())
    before = _snapshot(model)
    x, kwargs = _pixart_inputs(model, torch.bfloat16)
    with torch.no_grad():
        text = kwargs["encoder_hidden_states"].float()
        reference = exact(x.float(), **{**kwargs, "encoder_hidden_states": text})[0]
        plain = model(x, **kwargs)[0]
        with computed_in_fp32(model) as upcast:
            assert upcast and model.dtype == torch.bfloat16
            inside = model(x, **kwargs)[0]
    assert inside.dtype == plain.dtype == torch.bfloat16
    # the upcast run is the fp32 result rounded once (within one bf16 step); the plain one is not
    torch.testing.assert_close(inside, reference.to(torch.bfloat16), rtol=2 ** -7, atol=1e-6)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(plain, reference.to(torch.bfloat16), rtol=2 ** -7, atol=1e-6)
    assert _same(before, _snapshot(model))
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_computed_in_fp32_leaves_fp32_models_alone():
    model = build_pipeline("pixart").transformer
    assert not half_precision(model)
    with computed_in_fp32(model) as upcast:
        assert not upcast and not model._forward_pre_hooks


def test_computed_in_fp32_restores_after_an_error():
    model = _half_pipeline("pixart").transformer
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom"), computed_in_fp32(model):
        raise RuntimeError("boom")
    assert _same(before, _snapshot(model))


@pytest.mark.parametrize("fp32_calibration", [True, False])
def test_bac_calibrates_a_half_pipeline_in_fp32(fp32_calibration):
    """BAC's own calibration call computes in fp32 (``fp32_calibration``, the default), the user's calls
    in bf16; the user's output is the same either way up to the schedule, and bf16."""
    pipe = _half_pipeline("pixart")
    probe = pipe.transformer.transformer_blocks[0].attn1.to_q
    seen: list[torch.dtype] = []
    handle = probe.register_forward_pre_hook(lambda m, args: seen.append(m.weight.dtype))
    try:
        with accel.patch(pipe, accel.BACConfig(calibration_steps=6, calibration_batch=2,
                                               fp32_calibration=fp32_calibration)) as patch:
            _run(pipe, "pixart", steps=4)
            runtime = patch.handle("bac")
            assert runtime.calibration_generations == 1
            expected = "float32" if fp32_calibration else "bfloat16"
            assert patch.report().methods["bac"]["calibrated_in"] == f"{expected} (model stored in bfloat16)"
    finally:
        handle.remove()
    # the calibration call runs first, every unit at each of its 6 steps (CFG batched: one forward each);
    # then the user's call, which skips this branch at some of its 4 steps
    calibration, user = seen[:6], seen[6:]
    assert 0 < len(user) < 4
    assert set(calibration) == {torch.float32 if fp32_calibration else torch.bfloat16}
    assert set(user) == {torch.bfloat16}
    assert probe.weight.dtype == torch.bfloat16


def _methods(family: str) -> list[str]:
    methods = ["default", "bac", "bac:granularity=stack:weighting=snr:reuse=x0", "delta-dit:interval=2"]
    if family in VIDEO:
        return methods + ["adaspa", "vmoba", "vmoba+bac"]
    # QuEST calibrates with calls of the pipeline's default sizes, which only the image model takes; BAC's
    # fp32 calibration then runs through the quantized layers (kept quantized though too small to gain)
    quest = "quest:finetune_iters=0:calib_seeds=1:calib_steps=3:keep_float_when_faster=False"
    return methods + [quest, f"{quest}+bac"]


@pytest.mark.parametrize("family, dtype", [("pixart", torch.bfloat16), ("wan", torch.bfloat16),
                                           ("pixart", torch.float16)])
def test_every_method_runs_on_a_half_precision_pipeline_and_removes_exactly(family, dtype):
    """bf16 (and fp16) in, the same dtype through: each method's call gives finite output of the baseline's
    shape, caching skips compute, and after removal the pipeline's output is bit-identical to before.
    (HierarchicalPrune in bf16: tests/test_prune.py.)"""
    pipe = _half_pipeline(family, dtype)
    reference = _run(pipe, family)
    denoiser = pipe.transformer
    for method in _methods(family):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            patch = accel.patch(pipe) if method == "default" else accel.patch(pipe, *method.split("+"))
        try:
            _run(pipe, family)
            out = _run(pipe, family)
            assert out.shape == reference.shape and torch.isfinite(out).all(), method
            assert all(p.dtype in (dtype, torch.int8, torch.float32) for p in denoiser.parameters())
            facts = patch.report().methods
            if "bac" in facts:
                assert facts["bac"]["compute_fraction"] < 1.0, method
        finally:
            patch.remove()
        assert torch.equal(_run(pipe, family), reference), method
