"""Benchmark baselines: they skip compute, reset state between calls, keep CFG branches apart and
remove exactly; settings parse with clear errors."""

from __future__ import annotations

import sys

import pytest
import torch
from accel.benchmarks.baselines import BASELINES, parse_settings
from families import FAMILIES, run_loop
from tiny import TinyPipe

STEPS = 10
# Settings that make each cache skip on a tiny random model (its features change a lot between steps).
SKIPPING = {
    "fbcache": {"threshold": 10.0},
    "taylorseer": {"interval": 2, "warmup": 2},
    "magcache": {"threshold": 10.0, "max_skip_steps": 2},
    "pab": {"t_min": -1, "t_max": 1001},
    "fastercache": {"t_min": -1, "t_max": 1001},
}


def call(pipe: TinyPipe, handle=None) -> torch.Tensor:
    if handle is not None:
        handle.before_call()
    try:
        return pipe([1, 2, 3], num_inference_steps=STEPS)
    finally:
        if handle is not None:
            handle.after_call()


def count_calls(modules: list[torch.nn.Module]) -> list[int]:
    counts = [0] * len(modules)
    for i, module in enumerate(modules):
        module.register_forward_pre_hook(lambda m, a, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


def object_state(model: torch.nn.Module) -> dict[str, tuple]:
    return {name: (sorted(vars(m)), [id(p) for p in m._parameters.values()]) for name, m in model.named_modules()}


@pytest.mark.parametrize("name", sorted(SKIPPING))
def test_cache_skips_resets_and_removes_exactly(name: str) -> None:
    pipe = TinyPipe()
    blocks = pipe.transformer.transformer_blocks
    counts = count_calls([block.attn1.to_q for block in blocks])  # before apply: remove() keeps them
    reference = call(pipe)
    full = list(counts)
    state = object_state(pipe.transformer)

    handle = BASELINES[name].apply(pipe, SKIPPING[name], STEPS)
    if name == "magcache":  # the first call calibrates and skips nothing
        torch.testing.assert_close(call(pipe, handle), reference, rtol=0, atol=0)
    counts[:] = [0] * len(counts)
    first = call(pipe, handle)
    skipped = [f - c for f, c in zip(full, counts)]
    second = call(pipe, handle)

    assert torch.equal(first, second), "state leaked from one call into the next"
    assert torch.isfinite(first).all()
    assert not torch.equal(first, reference)
    assert (first - reference).norm() < 2 * reference.norm()
    assert sum(skipped) > 0, f"{name} computed every attention: {counts} of {full}"
    assert 0 < handle.report()["compute_fraction"] < 1

    handle.remove()
    assert torch.equal(call(pipe), reference)
    assert object_state(pipe.transformer) == state
    assert "_diffusers_hook" not in vars(pipe.transformer) and "forward" not in vars(blocks[0])


def test_new_call_without_before_call_starts_over() -> None:
    pipe = TinyPipe()
    handle = BASELINES["fbcache"].apply(pipe, SKIPPING["fbcache"], STEPS)
    handle.before_call()
    outputs = [pipe([1, 2], num_inference_steps=STEPS) for _ in range(2)]  # a rising timestep restarts
    handle.remove()
    assert torch.equal(*outputs)


def split_cfg_call(model: torch.nn.Module) -> None:
    """Cond and uncond as two forwards per step with the same timestep, as the Wan pipeline runs them."""
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in torch.linspace(900, 100, STEPS).round():
            cond = model(x, timestep=t.expand(2), class_labels=torch.tensor([1, 2])).sample
            uncond = model(x, timestep=t.expand(2), class_labels=torch.tensor([10, 10])).sample
            x = x - 0.1 * (uncond + 2.0 * (cond - uncond))


def test_separate_cfg_forwards_keep_separate_states() -> None:
    model = TinyPipe().transformer
    handle = BASELINES["taylorseer"].apply(model, SKIPPING["taylorseer"], STEPS)
    handle.before_call()
    split_cfg_call(model)
    manager = model.transformer_blocks[0].attn1._diffusers_hook.get_hook("taylorseer_cache").state_manager
    assert {name: s.current_step for name, s in manager._state_cache.items()} == {
        "cond": STEPS - 1, "uncond": STEPS - 1}
    handle.remove()

    handle = BASELINES["pab"].apply(model, SKIPPING["pab"], STEPS)
    handle.before_call()
    split_cfg_call(model)
    hook = model.transformer_blocks[0].attn1._diffusers_hook.get_hook("pyramid_attention_broadcast")
    assert {name: s.iteration for (_, name), s in handle._branch_states.items() if _ == id(hook)} == {
        "cond": STEPS, "uncond": STEPS}
    handle.remove()


@pytest.mark.parametrize("name", sorted(SKIPPING))
def test_cache_on_wan_with_separate_cfg(name: str) -> None:
    family, steps = FAMILIES["wan"], 6
    model = family.build()
    reference = run_loop(model, family, steps=steps, cfg="separate")
    handle = BASELINES[name].apply(model, SKIPPING[name], steps)
    outputs = []
    for _ in range(3):  # magcache calibrates in the first
        handle.before_call()
        outputs.append(run_loop(model, family, steps=steps, cfg="separate"))
        model._reset_stateful_cache()  # diffusers pipelines do this at the end of a call (CacheMixin models)
        handle.after_call()
    assert torch.equal(outputs[1], outputs[2]) and torch.isfinite(outputs[2]).all()
    assert handle.report()["compute_fraction"] < 1 and handle.report().get("calibrated", True)
    handle.remove()
    assert torch.equal(run_loop(model, family, steps=steps, cfg="separate"), reference)


@pytest.mark.skipif(BASELINES["torchao-int8"].available() is not None, reason="torchao is not installed")
def test_torchao_int8_quantizes_and_restores_the_same_weights() -> None:
    pipe = TinyPipe()
    reference = call(pipe)
    weights = {name: (id(p), p.clone()) for name, p in pipe.transformer.named_parameters()}
    handle = BASELINES["torchao-int8"].apply(pipe, {"compile": False}, STEPS)  # compiling: slow, same restore
    quantized = call(pipe, handle)
    assert torch.isfinite(quantized).all() and not torch.equal(quantized, reference)
    assert type(pipe.transformer.transformer_blocks[0].attn1.to_q.weight) is not torch.nn.Parameter
    handle.remove()
    assert torch.equal(call(pipe), reference)
    for name, p in pipe.transformer.named_parameters():
        assert id(p) == weights[name][0] and torch.equal(p, weights[name][1])


def test_torchao_missing_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # makes the import fail
    assert "torchao is not installed" in BASELINES["torchao-int8"].available()


def test_flex_window_attends_a_band_and_restores_exactly() -> None:
    from families import FAMILIES, run_loop

    from accel.hooks import accel_hook_names

    family = FAMILIES["wan"]
    model = family.build()
    base = run_loop(model, family, steps=3)
    keys = {n: sorted(m.__dict__) for n, m in model.named_modules()}
    handle = BASELINES["flex-window"].apply(model, {"density": 0.5, "block_size": 64}, 3)
    out = run_loop(model, family, steps=3)
    density = handle.report()["density"]
    handle.remove()
    assert torch.isfinite(out).all() and density is not None and density <= 1.0
    assert torch.equal(run_loop(model, family, steps=3), base)
    assert {n: sorted(m.__dict__) for n, m in model.named_modules()} == keys and accel_hook_names(model) == []
    with pytest.raises(ValueError, match=r"flex-window:density must be in \(0, 1\], got 1.5"):
        BASELINES["flex-window"].apply(model, {"density": 1.5, "block_size": 64}, 3)


def test_parse_settings_coerces_by_the_default_type() -> None:
    assert parse_settings(BASELINES["fbcache"], {"threshold": "0.1"}) == {"threshold": 0.1}
    assert parse_settings(BASELINES["taylorseer"], {"interval": "3"}) == {"interval": 3}
    assert parse_settings(BASELINES["torchao-int8"], {"compile": "true"}) == {"compile": True}


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_grid_points_round_trip_through_the_command_line(name: str) -> None:
    baseline = BASELINES[name]
    assert baseline.grid and isinstance(baseline.summary, str)
    for point in baseline.grid:
        assert parse_settings(baseline, {k: str(v) for k, v in point.items()}) == point


def test_parse_settings_errors() -> None:
    with pytest.raises(ValueError, match=r"fbcache has no setting 'treshold'; accepted: threshold"):
        parse_settings(BASELINES["fbcache"], {"treshold": "0.1"})
    with pytest.raises(ValueError, match=r"taylorseer:interval must be an int, got '2.5'\. Write e.g\. taylorseer:interval="):
        parse_settings(BASELINES["taylorseer"], {"interval": "2.5"})
    with pytest.raises(ValueError, match=r"torchao-int8:compile must be a bool \(true/false\), got 'maybe'"):
        parse_settings(BASELINES["torchao-int8"], {"compile": "maybe"})


def test_apply_rejects_bad_values_and_unknown_keys() -> None:
    pipe = TinyPipe()
    with pytest.raises(ValueError, match=r"fbcache:threshold must be a float >= 0, got -1.0"):
        BASELINES["fbcache"].apply(pipe, {"threshold": -1.0}, STEPS)
    with pytest.raises(ValueError, match=r"pab:t_max must be greater than t_min=500"):
        BASELINES["pab"].apply(pipe, {"t_min": 500, "t_max": 100}, STEPS)
    with pytest.raises(ValueError, match=r"magcache has no setting\(s\) \['bogus'\]; accepted:"):
        BASELINES["magcache"].apply(pipe, {"bogus": 1}, STEPS)
    assert "_diffusers_hook" not in vars(pipe.transformer)


def _pixart_call(pipe) -> torch.Tensor:
    return pipe(prompt=["a digit", "a seven"], num_inference_steps=STEPS, output_type="pt", height=32, width=32,
                use_resolution_binning=False, clean_caption=False, guidance_scale=4.5,
                generator=torch.Generator().manual_seed(0)).images


def _assert_skips_and_restores(name: str, pipe, call, settings: dict) -> None:
    """A peer that patches the pipeline class: blocks really skipped (compute fraction < 0.8), other
    outputs, and after removal the class, the modules' attributes and the outputs exactly as before."""
    cls_call = type(pipe).__call__
    reference = call(pipe)
    keys = {n: sorted(m.__dict__) for n, m in pipe.transformer.named_modules()}
    handle = BASELINES[name].apply(pipe, settings, STEPS)
    handle.before_call()
    cached = call(pipe)
    handle.after_call()
    fraction = handle.report()["compute_fraction"]
    assert fraction < 0.8, fraction
    assert torch.isfinite(cached).all() and not torch.equal(cached, reference)
    handle.remove()
    assert type(pipe).__call__ is cls_call and "_is_cached" not in type(pipe).__dict__
    assert {n: sorted(m.__dict__) for n, m in pipe.transformer.named_modules()} == keys
    assert torch.equal(call(pipe), reference)


@pytest.mark.skipif(BASELINES["cache-dit"].available() is not None, reason="cache-dit is not installed")
def test_cache_dit_skips_on_a_real_pipeline_and_restores_its_class() -> None:
    from tiny_pipelines import build_pipeline

    settings = {"threshold": 10.0, "warmup": 1}
    _assert_skips_and_restores("cache-dit", build_pipeline("pixart"), _pixart_call, settings)


@pytest.mark.skipif(BASELINES["cache-dit"].available() is not None, reason="cache-dit is not installed")
def test_cache_dit_refuses_what_it_cannot_drive() -> None:
    family = FAMILIES["wan"]
    with pytest.raises(ValueError, match="cache-dit needs a diffusers pipeline"):
        BASELINES["cache-dit"].apply(family.build(), {}, STEPS)
    with pytest.raises(ValueError, match=r"cache-dit:fn \+ bn must be at most the model's 3 blocks, got 5"):
        BASELINES["cache-dit"].apply(TinyPipe(), {"fn": 4, "bn": 1}, STEPS)


def test_cache_dit_missing_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cache_dit", None)
    assert "cache-dit is not installed" in BASELINES["cache-dit"].available()


def _wan_call(pipe) -> torch.Tensor:
    from tiny_pipelines import call_kwargs

    kwargs = {**call_kwargs("wan"), "num_inference_steps": STEPS}
    return pipe(generator=torch.Generator().manual_seed(0), **kwargs).frames


@pytest.mark.skipif(BASELINES["para-attn"].available() is not None, reason="para-attn is not installed")
def test_para_attn_skips_on_a_real_wan_pipeline_and_restores_its_class() -> None:
    from diffusers import WanTransformer3DModel
    from tiny_pipelines import build_pipeline

    pipe = build_pipeline("wan")
    torch.manual_seed(0)  # three blocks: First Block Cache skips the blocks after the first
    pipe.register_modules(transformer=WanTransformer3DModel.from_config({**pipe.transformer.config,
                                                                         "num_layers": 3}).eval())
    _assert_skips_and_restores("para-attn", pipe, _wan_call, {"threshold": 10.0})


@pytest.mark.skipif(BASELINES["para-attn"].available() is not None, reason="para-attn is not installed")
def test_para_attn_says_which_families_it_drives() -> None:
    from tiny_pipelines import build_pipeline

    with pytest.raises(ValueError, match="First Block Cache has no adapter for PixArtTransformer2DModel"):
        BASELINES["para-attn"].apply(build_pipeline("pixart"), {}, STEPS)
    with pytest.raises(ValueError, match="needs a diffusers pipeline"):
        BASELINES["para-attn"].apply(FAMILIES["wan"].build(), {}, STEPS)


def test_para_attn_missing_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "para_attn", None)
    assert "para-attn is not installed" in BASELINES["para-attn"].available()
