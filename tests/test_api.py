"""The patch spine: patch/remove/unpatch, composition checks, transactions, errors, lean import."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
from diffusers import DDIMScheduler
from tiny import loop, tiny_dit

import accel
from accel.config import MethodConfig, check_float
from accel.hooks import accel_hook_names
from accel.registry import Stage, register_method, unregister_method


def snapshot(model: torch.nn.Module) -> tuple[dict, dict]:
    keys = {name: sorted(m.__dict__) for name, m in model.named_modules()}
    return keys, {k: v.clone() for k, v in model.state_dict().items()}


def test_identity_patch_is_exact_and_removal_restores_state(identity_method):
    model = tiny_dit()
    before_out = loop(model)
    keys, state = snapshot(model)
    p = accel.patch(model, "identity")
    assert accel_hook_names(model)
    assert torch.equal(loop(model), before_out)
    p.remove()
    assert torch.equal(loop(model), before_out)
    after_keys, after_state = snapshot(model)
    assert after_keys == keys
    assert all(torch.equal(after_state[k], v) for k, v in state.items())
    assert accel_hook_names(model) == []


def test_context_manager_removes_on_error(identity_method):
    model = tiny_dit()
    keys, _ = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with accel.patch(model, identity_method()):
            raise RuntimeError("boom")
    assert snapshot(model)[0] == keys


def test_unpatch_and_double_patch(identity_method):
    model = tiny_dit()
    p = accel.patch(model, "identity")
    assert accel.active_patch(model) is p
    with pytest.raises(accel.AlreadyPatchedError, match="already patched by accel"):
        accel.patch(model, "identity")
    assert accel.unpatch(model) is True
    assert accel.unpatch(model) is False
    accel.patch(model, "identity").remove()


def test_steps_tracked_across_calls_with_other_counts_and_batches(identity_method):
    model = tiny_dit()
    p = accel.patch(model, "identity")
    handle = p.handle("identity")
    with pytest.raises(KeyError, match=r"'bac' is not attached to this patch \(attached: identity\)"):
        p.handle("bac")
    loop(model, steps=4, batch=2)
    loop(model, steps=3, batch=3, size=6)
    loop(model, steps=3, batch=3, size=6)
    assert handle.steps == [(i, 0) for i in range(4)] + [(i, 0) for i in range(3)] * 2
    p.remove()


def test_pipeline_scheduler_resets_steps(identity_method):
    class Pipe:
        def __init__(self) -> None:
            self.transformer = tiny_dit()
            self.scheduler = DDIMScheduler(num_train_timesteps=1000)

        def __call__(self, steps: int) -> None:
            self.scheduler.set_timesteps(steps)
            x = torch.randn(1, 1, 8, 8)
            for t in self.scheduler.timesteps:
                self.transformer(x, timestep=t.expand(1), class_labels=torch.tensor([1]))

    pipe = Pipe()
    p = accel.patch(pipe, "identity")
    pipe(5)
    assert p.tracker.state.num_steps == 5 and p.tracker.state.step_index == 4
    pipe(2)
    handle = p.handle("identity")
    assert handle.steps == [(i, 0) for i in range(5)] + [(0, 0), (1, 0)]
    p.remove()
    assert "set_timesteps" not in pipe.scheduler.__dict__


def test_device_timesteps_come_from_the_host_copy_at_the_predicted_step(identity_method, monkeypatch):
    """A timestep on an accelerator is not read back per forward: the scheduler's timesteps are copied to
    the host once per call and, once the scheduler has stepped, indexed by the step the tracker predicts.
    On pipeline loops (one forward per step; two CFG forwards per step) the prediction must match every
    forward; a hand-written loop after them gets no index (its timesteps are read)."""
    from tiny import TinyPipe

    from accel import api
    from accel.steps import host_timestep

    meta = torch.empty(1, device="meta")  # stands for a device tensor: reading it would fail
    assert host_timestep(meta, [900.0, 500.0], 1) == 500.0
    assert host_timestep(torch.tensor([7.0]), [900.0], 0) == 7.0  # host tensors are read directly
    assert host_timestep(torch.tensor([7.0]), [900.0], None) == 7.0
    seen = []

    def spy(timestep, host, index):
        seen.append((float(timestep.reshape(-1)[0]), host, index))
        return host_timestep(timestep, host, index)

    monkeypatch.setattr(api, "host_timestep", spy)
    pipe = TinyPipe()
    with accel.patch(pipe, "identity") as p:
        pipe([1, 2], num_inference_steps=4)
        host = pipe.scheduler.timesteps.float().tolist()
        assert [(t, i) for t, h, i in seen] == [(t, i or None) for i, t in enumerate(host)]  # step 0: read
        assert all(h == host for _, h, _ in seen)
        seen.clear()
        pipe.scheduler.set_timesteps(3)  # cond and uncond as separate forwards, as Wan runs them
        x = torch.randn(1, 1, 8, 8)
        with torch.no_grad():
            for t in pipe.scheduler.timesteps:
                for label in (1, 10):
                    eps = pipe.transformer(x, timestep=t.expand(1), class_labels=torch.tensor([label])).sample
                x = pipe.scheduler.step(eps, t, x).prev_sample
        host = pipe.scheduler.timesteps.float().tolist()
        assert [(t, i) for t, _, i in seen] == [(t, i or None) for i, t in enumerate(host) for _ in range(2)]
        seen.clear()
        p.reset(num_steps=2)  # a hand-written loop: its timesteps need not be the scheduler's
        for t in (700.0, 300.0):
            pipe.transformer(torch.randn(1, 1, 8, 8), timestep=torch.tensor([t]), class_labels=torch.tensor([1]))
        assert [(h, i) for _, h, i in seen] == [(None, None), (None, None)]
        assert p.handle("identity").steps[-2:] == [(0, 0), (1, 0)]


def test_separate_cfg_forwards_are_branches(identity_method):
    model = tiny_dit()
    p = accel.patch(model, "identity")
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        for t in (900.0, 500.0):
            for label in (3, 10):
                model(x, timestep=torch.tensor([t]), class_labels=torch.tensor([label]))
    assert p.handle("identity").steps == [(0, 0), (0, 1), (1, 0), (1, 1)]
    p.remove()


@dataclasses.dataclass(frozen=True, kw_only=True)
class FailingConfig(MethodConfig):
    rate: float = 0.5

    def __post_init__(self) -> None:
        check_float("FailingConfig.rate", self.rate, low=0.0, high=1.0, high_open=True)


def test_failed_method_rolls_back_everything(identity_method):
    def explode(ctx, config):
        ctx.hooks.add_hook(ctx.model, accel.hooks.CallbackHook(), "half-done")
        raise RuntimeError("cannot apply")

    register_method(FailingConfig, name="failing", stage=Stage.ATTENTION)(explode)
    try:
        model = tiny_dit()
        keys, _ = snapshot(model)
        with pytest.raises(RuntimeError, match="cannot apply"):
            accel.patch(model, "identity", "failing")
        assert snapshot(model)[0] == keys
        assert accel.active_patch(model) is None
    finally:
        unregister_method("failing")


def test_apply_must_return_a_handle_and_unregistered_methods_attach_like_registered_ones():
    register_method(FailingConfig, name="failing", stage=Stage.ATTENTION)(lambda ctx, config: object())
    try:
        model = tiny_dit()
        with pytest.raises(TypeError, match=r"'failing' returned object from apply, which is not a handle"):
            accel.patch(model, "failing")
        assert accel.active_patch(model) is None
    finally:
        unregister_method("failing")

    class Counting:
        def __init__(self, ctx: accel.PatchContext) -> None:
            self.steps: list[int] = []
            self.removed = False
            block = ctx.adapter.blocks()[0]
            ctx.hooks.add_hook(block.module, accel.hooks.CallbackHook(
                before=lambda m, a, k: self.steps.append(ctx.tracker.state.step_index)), "count")

        def report(self) -> dict:
            return {"forwards": len(self.steps)}

        def remove(self) -> None:
            self.removed = True

    model = tiny_dit()
    keys, _ = snapshot(model)
    patch = accel.Patch.on(model)
    handle = patch.attach("counting", Counting)
    loop(model, steps=3)
    assert handle.steps == [0, 1, 2] and patch.handle("counting") is handle
    assert patch.report().methods["counting"] == {"settings": {}, "forwards": 3}
    with pytest.raises(accel.AlreadyPatchedError):
        accel.Patch.on(model)
    patch.remove()
    assert handle.removed and snapshot(model)[0] == keys and accel.active_patch(model) is None


def test_unknown_method_has_did_you_mean(identity_method):
    with pytest.raises(accel.UnknownMethodError, match=r"Unknown method 'identiy'\. Did you mean 'identity'\?"):
        accel.patch(tiny_dit(), "identiy")


def test_bad_settings_are_clear(identity_method):
    with pytest.raises(ValueError, match=r"IdentityConfig has no setting 'speed'\. Accepted: level"):
        accel.patch(tiny_dit(), "identity:speed=3")
    with pytest.raises(ValueError, match=r"IdentityConfig.level must be an int in \[0, 3\], got 7"):
        accel.patch(tiny_dit(), "identity:level=7")
    with pytest.raises(ValueError, match=r"IdentityConfig.level must be an int, got 'x'"):
        accel.patch(tiny_dit(), "identity:level=x")
    with pytest.raises(ValueError, match=r"settings are written key=value"):
        accel.patch(tiny_dit(), "identity:level")


def test_conflicting_methods_refused(identity_method):
    with pytest.raises(accel.IncompatibleMethodsError, match="cannot be applied twice"):
        accel.patch(tiny_dit(), "identity", "identity:level=2")


def test_non_model_target_refused():
    with pytest.raises(accel.UnsupportedModelError, match=r"needs a diffusers pipeline .* got str"):
        accel.patch("not a model", "identity")


def test_unsupported_class_lists_supported():
    with pytest.raises(accel.UnsupportedModelError, match=r"No accel adapter for Linear\. Supported: .*DiTTransformer2DModel"):
        accel.patch(torch.nn.Linear(2, 2), "identity")


def test_no_methods_and_no_recipe_is_clear():
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2)
    with pytest.raises(accel.UnsupportedModelError, match=r"no method and has no default recipe for timm_vit models"):
        accel.patch(vit)


def test_no_methods_uses_the_default_caching_recipe():
    from tiny import TinyPipe

    model = tiny_dit()
    with accel.patch(model) as p:  # a bare model: no scheduler to read noise levels from
        assert [type(c).__name__ for c in p.methods] == ["DeltaDiTConfig"]
    pipe = TinyPipe()
    base = pipe([1], num_inference_steps=6)
    with accel.patch(pipe) as p:
        (config,) = p.methods
        settings = (config.granularity.value, config.weighting.value, config.reuse.value)
        assert (type(config).__name__, settings) == ("BACConfig", ("stack", "snr", "x0"))
        cached = pipe([1], num_inference_steps=6)  # cached from the first call on
        assert p.report().methods["bac"]["compute_fraction"] < 1.0
    assert torch.isfinite(cached).all() and not torch.equal(cached, base)
    pipe.scheduler.register_to_config(prediction_type=None)  # a scheduler that does not name it: Δ reuse
    with accel.patch(pipe) as p:
        assert p.methods[0].reuse.value == "delta"


def test_config_round_trip_and_options(identity_method):
    config = identity_method(level=2)
    assert identity_method.from_dict(config.to_dict()) == config
    assert config.to_dict() == {"_type": "IdentityConfig", "_version": 1, "_data": {"level": 2}}
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.level = 3  # type: ignore[misc]
    p = accel.patch(tiny_dit(), identity={"level": 3})
    assert p.methods == (identity_method(level=3),)
    assert "identity" in str(p.report())
    p.remove()


def test_import_is_lean():
    code = (
        "import sys, accel, accel.kernels; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('triton', 'gradio')]; "
        "import torch; assert not torch.cuda.is_initialized(); print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_subpackages_are_attributes_without_an_import():
    """The README's first lines (``accel.pipelines.load``) work in a fresh process."""
    code = ("import sys, accel; assert 'accel.pipelines' not in sys.modules; "
            "print(callable(accel.pipelines.load), callable(accel.metrics.psnr))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True True"
    with pytest.raises(AttributeError, match="has no attribute 'pipline'"):
        accel.pipline


def test_coexists_with_diffusers_first_block_cache(identity_method):
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache
    from diffusers.hooks.hooks import CacheContext, HookRegistry, _set_cache_context

    model = tiny_dit()
    apply_first_block_cache(model, FirstBlockCacheConfig(threshold=0.0))  # threshold 0: never reuse

    def run() -> torch.Tensor:
        HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks()
        _set_cache_context(model, CacheContext("batched"))
        return loop(model)

    with_fbcache = run()
    diffusers_hooks = {n: list(m._diffusers_hook.hooks) for n, m in model.named_modules() if hasattr(m, "_diffusers_hook")}
    p = accel.patch(model, "identity")
    assert torch.equal(run(), with_fbcache)
    p.remove()
    after = {n: list(m._diffusers_hook.hooks) for n, m in model.named_modules() if hasattr(m, "_diffusers_hook")}
    assert after == diffusers_hooks and accel_hook_names(model) == []
    assert torch.equal(run(), with_fbcache)
