"""BAC's stack unit with ``reuse="x0"``: the scheduler's parameterisations (``accel.noise``), compute really
skipped, the same output as a hand-written reference, real pipeline families, clear errors."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EDMEulerScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from tiny import TinyPipe, tiny_dit

import accel
from accel.errors import UnsupportedModelError
from accel.methods.bac import BACConfig
from accel.noise import (
    NoisyInput,
    Prediction,
    current_input,
    from_clean,
    prediction_of,
    prediction_split,
    step_inputs,
    to_clean,
)
from accel.registry import find_adapter

X0_SPEC = "bac:granularity=stack:weighting=snr:update_fraction=0.5:calibration_steps=8:reuse=x0"


def _outputs(kind: Prediction, x0: torch.Tensor, eps: torch.Tensor, at: NoisyInput) -> torch.Tensor:
    """What a perfect denoiser of each parameterisation returns for x_t = α·x0 + σ·ε."""
    return {Prediction.EPSILON: eps, Prediction.V: at.alpha * eps - at.sigma * x0,
            Prediction.SAMPLE: x0, Prediction.FLOW: eps - x0}[kind]


@pytest.mark.parametrize("kind", list(Prediction))
def test_clean_estimate_is_what_each_parameterisation_predicts(kind):
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, 4, generator=gen), torch.randn(2, 3, 4, generator=gen)
    sigma = 0.6
    at = NoisyInput(alpha=1 - sigma, sigma=sigma) if kind is Prediction.FLOW else NoisyInput(0.8, 0.6)
    x = at.alpha * x0 + at.sigma * eps
    out = _outputs(kind, x0, eps, at)
    torch.testing.assert_close(to_clean(kind, out, x, at), x0)
    later = NoisyInput(0.9, 0.1) if kind is Prediction.FLOW else NoisyInput(0.995, (1 - 0.995 ** 2) ** 0.5)
    x_later = later.alpha * x0 + later.sigma * eps
    # the output that states the same x0 at another noisy input is the perfect denoiser's output there
    torch.testing.assert_close(from_clean(kind, x0, x_later, later), _outputs(kind, x0, eps, later),
                               atol=1e-5, rtol=1e-5)


def test_schedulers_name_their_parameterisation_and_noise_levels():
    assert prediction_of(DDIMScheduler()) is Prediction.EPSILON
    assert prediction_of(DDIMScheduler(prediction_type="v_prediction")) is Prediction.V
    assert prediction_of(FlowMatchEulerDiscreteScheduler()) is Prediction.FLOW
    assert prediction_of(object()) is None
    assert prediction_of(EDMEulerScheduler()) is None  # preconditioned outputs: none of the four

    ddim = DDIMScheduler()
    ddim.set_timesteps(5)
    t = int(ddim.timesteps[2])
    abar = float(ddim.alphas_cumprod[t])
    assert current_input(ddim, 2, float(t)) == pytest.approx(NoisyInput(abar ** 0.5, (1 - abar) ** 0.5))
    assert step_inputs(ddim, 5)[2] == current_input(ddim, 2, float(t))

    flow = FlowMatchEulerDiscreteScheduler(shift=3.0)
    flow.set_timesteps(6)
    s = float(flow.sigmas[1])
    assert current_input(flow, 1, None) == pytest.approx(NoisyInput(1 - s, s))
    flow.set_begin_index(3)  # an img2img loop starts part-way: its step 0 is the scheduler's step 3
    s3 = float(flow.sigmas[3])
    assert current_input(flow, 0, None) == pytest.approx(NoisyInput(1 - s3, s3))

    # VP samplers keep the ratio σ/α in ``sigmas``; the model sees α·x0 + σ·ε (Euler scales its input back)
    for scheduler in (DPMSolverMultistepScheduler(), EulerDiscreteScheduler()):
        scheduler.set_timesteps(4)
        ratio = float(scheduler.sigmas[0])
        at = current_input(scheduler, 0, float(scheduler.timesteps[0]))
        assert at.sigma / at.alpha == pytest.approx(ratio)
        assert at.alpha ** 2 + at.sigma ** 2 == pytest.approx(1)
    assert current_input(object(), 0, 10.0) is None


def test_prediction_split_finds_learned_variance_and_refuses_other_shapes():
    assert prediction_split((2, 4, 8, 8), (2, 4, 8, 8)) is None
    assert prediction_split((2, 8, 8, 8), (2, 4, 8, 8)) == 1  # DiT / PixArt: prediction, then variance
    assert prediction_split((2, 16, 64), (2, 16, 32)) == 2
    with pytest.raises(ValueError, match="extra condition channels"):
        prediction_split((2, 4, 8, 8), (2, 9, 8, 8))


def _reference(pipe: TinyPipe, updates: set[int], labels: list[int], steps: int) -> torch.Tensor:
    """x0 reuse written out by hand: run the model at ``updates`` (step indices), elsewhere return the ε
    that states the last computed x̂0 at the current input."""
    model, forward = pipe.transformer, pipe.transformer.forward
    abar, cache, index = pipe.scheduler.alphas_cumprod, {}, [0]

    def patched(hidden_states, timestep=None, **kwargs):
        step = index[0]
        index[0] += 1
        a = float(abar[int(timestep[0])])
        alpha, sigma = a ** 0.5, (1 - a) ** 0.5
        if step in updates:
            out = forward(hidden_states, timestep=timestep, **kwargs)
            cache["x0"] = (hidden_states - sigma * out.sample) / alpha
            return out
        return Transformer2DModelOutput(sample=(hidden_states - alpha * cache["x0"]) / sigma)

    model.forward = patched
    try:
        return pipe(labels, num_inference_steps=steps)
    finally:
        del model.forward


def test_x0_reuse_skips_the_whole_denoiser_and_equals_the_reference():
    pipe = TinyPipe(layers=3)
    steps, labels = 8, [1, 2]
    baseline = pipe(labels, num_inference_steps=steps)
    embeds = []
    pipe.transformer.pos_embed.register_forward_pre_hook(lambda m, a: embeds.append(a[0].shape[0]))
    with accel.patch(pipe, X0_SPEC) as p:
        out = pipe(labels, num_inference_steps=steps)
        runtime = p.handle("bac")
        updates = set(runtime.active["stack"])
        calibration = len(embeds) - steps // 2
        facts = p.report().methods["bac"]
    assert len(updates) == steps // 2 and 0 in updates
    assert calibration == 8  # the online calibration call ran every one of its 8 steps
    assert len(embeds) - calibration == len(updates)  # reused steps run not even the patch embedding
    assert facts["compute_fraction_last_call"] == pytest.approx(0.5)
    after = pipe(labels, num_inference_steps=steps)
    assert torch.equal(after, baseline)  # removal restores the model exactly
    embeds.clear()
    torch.testing.assert_close(out, _reference(pipe, updates, labels, steps), atol=1e-5, rtol=1e-5)
    assert not torch.equal(out, baseline)


def test_x0_reuse_keeps_the_output_form_and_each_cfg_branch():
    """A denoiser called with return_dict=False, cond and uncond as separate forwards (as Wan and Flux
    true-CFG do): every branch reuses its own x̂0 and gets back a tuple."""
    pipe = TinyPipe(layers=2)
    model = pipe.transformer
    calls = []

    class SplitCFG(TinyPipe):
        def __call__(self, class_labels, num_inference_steps=10, generator=None, output_type="pt"):
            self.scheduler.set_timesteps(num_inference_steps)
            x = torch.randn(len(class_labels), 1, 8, 8, generator=torch.Generator().manual_seed(0))
            labels = torch.tensor(class_labels)
            with torch.no_grad():
                for t in self.scheduler.timesteps:
                    cond = model(x, timestep=t.expand(len(labels)), class_labels=labels, return_dict=False)
                    uncond = model(x, timestep=t.expand(len(labels)), class_labels=labels * 0,
                                   return_dict=False)
                    calls.append((type(cond), type(uncond), torch.equal(cond[0], uncond[0])))
                    eps = uncond[0] + 2.0 * (cond[0] - uncond[0])
                    x = self.scheduler.step(eps, t, x).prev_sample
            return x

    split = SplitCFG(layers=2)
    split.transformer = model
    baseline = split([3, 4], num_inference_steps=6)
    with accel.patch(split, BACConfig(granularity="stack", weighting="snr", update_fraction=0.5,
                                      calibration_steps=6, reuse="x0")) as p:
        calls.clear()
        out = split([3, 4], num_inference_steps=6)
        assert p.report().methods["bac"]["compute_fraction_last_call"] == pytest.approx(0.5)
    # one x̂0 per branch: a shared cache would hand the uncond branch the cond estimate on reused steps
    assert calls == [(tuple, tuple, False)] * 12  # the calibration call's 6 steps, then the call's
    assert torch.isfinite(out).all() and not torch.equal(out, baseline)


@pytest.mark.parametrize("family", ["dit", "sd3", "cogvideox", "wan"])
def test_x0_reuse_on_real_pipeline_families(family):
    """Learned variance + DPM-Solver (DiT), flow matching (SD3; Wan's UniPC with flow sigmas, cond and
    uncond as separate forwards), v-prediction (CogVideoX, as its checkpoints ship)."""
    from diffusers import CogVideoXDDIMScheduler
    from tiny_pipelines import build_pipeline, call_kwargs

    pipe = build_pipeline(family)
    if family == "cogvideox":
        pipe.scheduler = CogVideoXDDIMScheduler(prediction_type="v_prediction")
    kwargs = {**call_kwargs(family), "num_inference_steps": 6}

    def run():
        result = pipe(**kwargs, generator=torch.Generator().manual_seed(0))
        return result.frames if hasattr(result, "frames") else result.images

    baseline = run()
    forwards = []
    pipe.transformer.register_forward_pre_hook(lambda m, a: forwards.append(1))
    blocks = find_adapter(pipe.transformer).blocks()
    ran = []
    blocks[0].module.register_forward_pre_hook(lambda m, a: ran.append(1))
    with accel.patch(pipe, X0_SPEC.replace("calibration_steps=8", "calibration_steps=6")) as p:
        forwards.clear(), ran.clear()
        out = run()
        facts = p.report().methods["bac"]
    assert facts["compute_fraction_last_call"] == pytest.approx(0.5)
    per_step = 2 if family == "wan" else 1  # forwards per step
    calibration = 6 * per_step  # the online calibration call's forwards, every one run
    assert len(forwards) == calibration + 6 * per_step
    assert len(ran) == calibration + 3 * per_step  # half of the call's ran
    assert out.shape == baseline.shape and torch.isfinite(out).all()
    assert torch.equal(run(), baseline)


def test_x0_reuse_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match="needs granularity='stack'"):
        BACConfig(reuse="x0")
    with pytest.raises(ValueError, match="BACConfig.reuse must be one of 'delta', 'x0'"):
        BACConfig(granularity="stack", reuse="eps")
    config = BACConfig(granularity="stack", weighting="similarity", reuse="x0")
    with pytest.raises(ValueError, match="patch the pipeline, not the bare model"):
        accel.patch(tiny_dit(), config)
    pipe = TinyPipe()
    pipe.scheduler.register_to_config(prediction_type="something-else")
    with pytest.raises(UnsupportedModelError, match="names no prediction type"):
        accel.patch(pipe, config)


def test_x0_reuse_falls_back_to_delta_where_the_output_is_not_an_estimate_of_the_input():
    """An inpainting-style denoiser takes extra condition channels: its output has fewer channels than its
    input, so x̂0 cannot be read; the stack reuses its Δ instead, with one warning."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=2, out_channels=1,
                                  num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()

    class InpaintPipe(TinyPipe):
        def __call__(self, class_labels, num_inference_steps=10, generator=None, output_type="pt"):
            self.scheduler.set_timesteps(num_inference_steps)
            x = torch.randn(len(class_labels), 1, 8, 8, generator=torch.Generator().manual_seed(0))
            mask = torch.ones_like(x)
            labels = torch.tensor(class_labels)
            with torch.no_grad():
                for t in self.scheduler.timesteps:
                    eps = self.transformer(torch.cat([x, mask], 1), timestep=t.expand(len(labels)),
                                           class_labels=labels).sample
                    x = self.scheduler.step(eps, t, x).prev_sample
            return x

    pipe = InpaintPipe()
    pipe.transformer = model
    with accel.patch(pipe, X0_SPEC) as p:
        with pytest.warns(UserWarning, match="Reusing the stack's Δ instead"):
            pipe([1, 2], num_inference_steps=8)
        out = pipe([1, 2], num_inference_steps=8)
        assert p.report().methods["bac"]["compute_fraction_last_call"] == pytest.approx(0.5)
    assert torch.isfinite(out).all()
