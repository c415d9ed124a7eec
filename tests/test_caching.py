"""Δ-DiT and BAC: compute really skipped, determinism, state reset, the scheduler and its artifacts."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import accel
from accel.methods.bac import BACConfig, calibrate
from accel.methods.bac_schedule import (
    BACSchedule,
    Metric,
    bubbling_union,
    reuse_error,
    schedule_updates,
    similarity_matrix,
    step_sensitivity,
)
from accel.methods.delta_dit import DeltaDiTConfig
from tiny import TinyPipe, loop, tiny_dit


def count_calls(modules: list[torch.nn.Module]) -> list[int]:
    counts = [0] * len(modules)
    for i, module in enumerate(modules):
        module.register_forward_pre_hook(lambda m, a, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


def brute_force(sim: np.ndarray, k: int) -> float:
    t = sim.shape[0]
    best = -np.inf
    for rest in itertools.combinations(range(1, t), k - 1):
        starts = (0, *rest)
        total = sum(sim[max(s for s in starts if s <= i), i] for i in range(t))
        best = max(best, total)
    return best


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_scheduler_dp_equals_brute_force(seed, k):
    rng = np.random.default_rng(seed)
    sim = similarity_matrix(rng.normal(size=(8, 5)), Metric.COSINE)
    starts = schedule_updates(sim, k)
    assert starts[0] == 0 and len(starts) == k and starts == sorted(set(starts))
    total = sum(sim[max(s for s in starts if s <= i), i] for i in range(8))
    assert total == pytest.approx(brute_force(sim, k))


def test_distances_are_minimised():
    # steps 0-2 identical, 3-5 identical: with 2 updates the optimum splits exactly at 3, for every metric
    features = np.array([[1.0, 0.0]] * 3 + [[0.0, 5.0]] * 3)
    for metric in Metric:
        assert schedule_updates(similarity_matrix(features, metric), 2) == [0, 3]


def test_bubbling_union_hand_made():
    schedules = {"0.attn": [0, 5], "0.ffn": [0, 2], "1.attn": [0, 3], "1.ffn": [0, 4], "2.ffn": [0, 6]}
    layer_of = {"0.attn": 0, "0.ffn": 0, "1.attn": 1, "1.ffn": 1, "2.ffn": 2}
    volatility = {"0.attn": 0.1, "0.ffn": 0.2, "1.attn": 0.9, "1.ffn": 0.05, "2.ffn": 0.01}
    out = bubbling_union(schedules, volatility, 1, layer_of, {"0.ffn", "1.ffn", "2.ffn"})
    assert out["1.attn"] == [0, 3, 4, 6]  # its own + FFNs at layers >= 1
    assert {k: v for k, v in out.items() if k != "1.attn"} == {k: v for k, v in schedules.items() if k != "1.attn"}
    assert bubbling_union(schedules, volatility, 0, layer_of, {"0.ffn"}) == schedules


def test_delta_dit_skips_blocks_and_reports():
    model = tiny_dit(layers=4)
    attn_calls = count_calls([b.attn1 for b in model.transformer_blocks])
    p = accel.patch(model, DeltaDiTConfig(cached_blocks=2, interval=2, boundary=0.5))
    p.reset(num_steps=6)
    loop(model, steps=6)
    # full steps 0, 2, 4 run 4 blocks; cached steps 1 (rear: blocks 2-3) and 3, 5 (front: blocks 0-1)
    assert attn_calls == [4, 4, 5, 5]
    report = p.report().methods["delta-dit"]
    assert report["compute_fraction"] == pytest.approx(18 / 24)
    assert "skipped transformer_blocks.2, transformer_blocks.3" in report["per_step"][1]
    p.remove()


@pytest.mark.parametrize("steps", [4, 6, 9])
def test_delta_dit_places_its_boundary_by_timestep_without_a_step_count(steps):
    """A hand-written loop that never calls patch.reset(num_steps=N): the boundary comes from the noise
    level, which on these uniform schedules puts every cached step in the same range as the step count."""
    model = tiny_dit(layers=4)
    config = DeltaDiTConfig(cached_blocks=2, interval=2, boundary=0.5)
    with accel.patch(model, config) as p:
        p.reset(num_steps=steps)
        by_count = loop(model, steps=steps)
        assert p.report().methods["delta-dit"]["boundary_by"] == "step count"
    with accel.patch(model, config) as p:
        by_timestep = loop(model, steps=steps)
        facts = p.report().methods["delta-dit"]
    assert facts["boundary_by"].startswith("timestep (the step count is unknown")
    assert facts["compute_fraction"] < 1.0
    assert torch.equal(by_timestep, by_count)


def test_delta_dit_bad_settings():
    with pytest.raises(ValueError, match=r"DeltaDiTConfig.interval must be an int >= 1, got 0"):
        DeltaDiTConfig(interval=0)
    with pytest.raises(ValueError, match=r"DeltaDiTConfig.boundary must be in \[0.0, 1.0\], got 1.5"):
        DeltaDiTConfig(boundary=1.5)
    with pytest.raises(ValueError, match=r"cached_blocks must be <= the model's 3 blocks, got 5"):
        accel.patch(tiny_dit(), DeltaDiTConfig(cached_blocks=5))


@pytest.mark.parametrize("method", ["delta-dit:cached_blocks=2", "bac:updates=3"])
def test_cached_runs_deterministic_and_state_reset(method):
    pipe = TinyPipe()
    fresh_pipe = TinyPipe()
    with accel.patch(pipe, method):
        pipe([1, 2], num_inference_steps=8)  # warm: online calibration for bac
        a = pipe([1, 2], num_inference_steps=8)
        b = pipe([1, 2], num_inference_steps=8)
        assert torch.equal(a, b)
        pipe([4, 5, 6], num_inference_steps=5)  # other labels, batch and step count in between
        pipe([4, 5, 6], num_inference_steps=5)
        c = pipe([1, 2], num_inference_steps=8)
    assert torch.equal(a, c)
    with accel.patch(fresh_pipe, method):
        fresh_pipe([1, 2], num_inference_steps=8)
        d = fresh_pipe([1, 2], num_inference_steps=8)
    assert torch.equal(a, d)


def test_unpatch_is_bit_identical():
    pipe = TinyPipe()
    base = pipe([3], num_inference_steps=6)
    for method in ("delta-dit", "bac:updates=2"):
        p = accel.patch(pipe, method)
        pipe([3], num_inference_steps=6)
        pipe([3], num_inference_steps=6)
        p.remove()
        assert torch.equal(pipe([3], num_inference_steps=6), base)


def test_bac_skips_branches_by_schedule(tmp_path):
    pipe = TinyPipe()
    schedule = calibrate(pipe, num_inference_steps=6, config=BACConfig(updates=2, bubbling=0),
                         calls=[{"class_labels": [1, 2]}], save_to=str(tmp_path / "s.json"))
    plan = schedule.steps[6]
    assert all(len(steps) == 2 and steps[0] == 0 for steps in plan.values())
    blocks = pipe.transformer.transformer_blocks
    q_calls = count_calls([b.attn1.to_q for b in blocks])
    ff_calls = count_calls([b.ff.net[0] for b in blocks])
    with accel.patch(pipe, BACConfig(updates=2, bubbling=0, schedule=str(tmp_path / "s.json"))) as p:
        pipe([1, 2], num_inference_steps=6)
        report = p.report().methods["bac"]
    assert q_calls == [len(plan[f"transformer_blocks.{i}.self_attn"]) for i in range(3)]
    assert ff_calls == [len(plan[f"transformer_blocks.{i}.ffn"]) for i in range(3)]
    assert report["compute_fraction"] == pytest.approx(2 / 6, abs=1e-3)


def test_bac_schedule_round_trip_and_mismatches(tmp_path):
    pipe = TinyPipe()
    path = tmp_path / "s.json"
    schedule = calibrate(pipe, num_inference_steps=5, config=BACConfig(updates=2), calls=[{"class_labels": [0]}])
    schedule.save(path)
    loaded = BACSchedule.load(path)
    assert loaded.to_json() == schedule.to_json()
    assert loaded.distances is not None and loaded.distances.steps == 5
    with accel.patch(pipe, BACConfig(schedule=str(path), calibrate_online=False)) as p:
        pipe([0], num_inference_steps=7)  # derived from the saved feature distances
        assert "7" in str(p.report().methods["bac"]["schedules"])
    # A schedule without its feature distances serves only the step counts it names.
    bare = tmp_path / "no-curve.json"
    loaded.distances = None
    loaded.save(bare)
    with accel.patch(pipe, BACConfig(schedule=str(bare), calibrate_online=False)):
        mismatch = r"no schedule for 7 steps \(calibrated: \[5\], on calls \{.*class_labels"
        with pytest.raises(accel.ArtifactMismatchError, match=mismatch):
            pipe([0], num_inference_steps=7)
    other = TinyPipe(layers=2)
    with pytest.raises(accel.ArtifactMismatchError, match="belongs to model DiTTransformer2DModel:"):
        accel.patch(other, BACConfig(schedule=str(path)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        accel.patch(other, BACConfig(schedule=str(tmp_path / "missing.json")))


def test_bac_bad_settings():
    with pytest.raises(ValueError, match=r"BACConfig.calibration_steps must be an int >= 2, got 1"):
        BACConfig(calibration_steps=1)
    with pytest.raises(ValueError, match=r"BACConfig.calibration_batch must be an int >= 1, got 0"):
        accel.patch(TinyPipe(), "bac:calibration_batch=0")
    with pytest.raises(ValueError, match=r"BACConfig.metric must be one of 'cosine', 'l1', 'l2', got 'dot'"):
        BACConfig(metric="dot")
    with pytest.raises(ValueError, match=r"BACConfig.updates must be an int >= 1, got 0"):
        accel.patch(TinyPipe(), "bac:updates=0")


def test_caching_refused_on_classifier():
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2)
    with pytest.raises(accel.UnsupportedModelError, match="'delta-dit' cannot apply to VisionTransformer"):
        accel.patch(vit, "delta-dit")


def _denoiser_families():
    from families import FAMILIES

    return [name for name, family in FAMILIES.items() if family.is_denoiser]


@pytest.mark.parametrize("family_name", _denoiser_families())
@pytest.mark.parametrize("method", ["delta-dit:cached_blocks=1", "bac:updates=2", "bac:updates=2:granularity=stack"])
def test_every_family_runs_cached(family_name, method):
    from families import FAMILIES, run_loop

    family = FAMILIES[family_name]
    model = family.build()
    base = run_loop(model, family, steps=4, cfg="separate")
    if ("delta-dit" in method or "stack" in method) and family_name == "unet":
        with pytest.raises(accel.UnsupportedModelError, match="one residual chain"):
            accel.patch(model, method)
        return
    with accel.patch(model, method) as p:
        p.reset(num_steps=4)
        if method.startswith("bac"):
            run_loop(model, family, steps=4, cfg="separate")  # online calibration at 4 steps
            p.reset(num_steps=4)
        out = run_loop(model, family, steps=4, cfg="separate")
        fraction = p.report().methods[method.split(":")[0]]["compute_fraction"]
    assert torch.isfinite(out).all() and out.shape == base.shape
    assert fraction < 1.0
    assert torch.equal(run_loop(model, family, steps=4, cfg="separate"), base)


class CountingPipe(TinyPipe):
    """TinyPipe that counts its calls (what a calibration costs in generations)."""

    calls = 0

    def __call__(self, class_labels, num_inference_steps: int = 10, generator=None, output_type: str = "pt"):
        self.calls += 1
        return super().__call__(class_labels, num_inference_steps, generator, output_type)


def test_default_recipe_call_never_depends_on_earlier_calls():
    # The case of the issue: the same request before and after others with other labels, batch and steps.
    pipe = CountingPipe()
    with accel.patch(pipe) as p:
        a = pipe([1, 2], num_inference_steps=6)
        assert pipe.calls == 2  # the whole calibration: one generation before the first call
        assert p.report().methods["bac"]["calibration_generations"] == 1
        assert p.report().methods["bac"]["compute_fraction"] < 1.0  # the first call is cached
        pipe([3, 4, 5], num_inference_steps=9)
        b = pipe([1, 2], num_inference_steps=6)
        assert pipe.calls == 4
    assert torch.equal(a, b)
    assert type(pipe) is CountingPipe  # removal restores the pipeline's class
    fresh = CountingPipe()  # a fresh process: same model, a new patch, this call first
    with accel.patch(fresh):
        assert torch.equal(fresh([1, 2], num_inference_steps=6), a)


def test_prepare_calibrates_before_the_call_and_changes_nothing():
    # What a benchmark or the demo does to keep BAC's calibration call out of a timed call.
    pipe = CountingPipe()
    with accel.patch(pipe) as p:
        p.prepare([1, 2], num_inference_steps=6)
        assert pipe.calls == 1 and p.report().methods["bac"]["calibration_generations"] == 1
        p.prepare([3, 4], num_inference_steps=6)  # the same settings: nothing to do
        assert pipe.calls == 1
        a = pipe([1, 2], num_inference_steps=6)
        assert pipe.calls == 2 and p.report().methods["bac"]["calibration_generations"] == 1
        with pytest.raises(TypeError, match="do not fit CountingPipe's call"):
            p.prepare([1], steps=6)
    with accel.patch(CountingPipe()) as q:
        assert torch.equal(q.pipeline([1, 2], num_inference_steps=6), a)  # as if never prepared
    model = TinyPipe().transformer
    with accel.patch(model, "delta-dit") as bare, pytest.raises(TypeError, match="on a bare"):
        bare.prepare(num_inference_steps=6)


def test_per_request_step_counts_reuse_from_the_first_call():
    pipe = TinyPipe()
    outputs, fractions = [], []
    spec = "bac:granularity=stack:weighting=snr:update_fraction=0.4:calibration_steps=30"
    with accel.patch(pipe, spec) as p:
        for steps in (20, 30, 20):
            outputs.append(pipe([1, 2], num_inference_steps=steps))
            fractions.append(p.report().methods["bac"]["compute_fraction_last_call"])
        schedules = p.report().methods["bac"]["schedules"]
    assert fractions == pytest.approx([0.4, 0.4, 0.4], abs=0.03)
    assert torch.equal(outputs[0], outputs[2])
    assert "calibrated" in schedules[30] and "derived over noise level" in schedules[20]
    fresh = TinyPipe()
    with accel.patch(fresh, spec):
        assert torch.equal(fresh([1, 2], num_inference_steps=30), outputs[1])


def test_noise_level_distances_by_hand():
    from accel.methods.bac_schedule import NoiseLevelDistances, squared_distances

    # one unit's features at noise levels 1.0, 0.5, 0.0
    features = {"u": np.array([[0.0, 0.0], [1.0, 1.0], [4.0, 4.0]])}
    recorded = NoiseLevelDistances.from_features([1.0, 0.5, 0.0], features, weights=[0.0, 1.0, 2.0])
    exact = squared_distances(features["u"])
    assert recorded.distances("u", [1.0, 0.5, 0.0]) == pytest.approx(exact)  # at the recorded levels
    # between them bilinear: level 0.75 is halfway between steps 0 and 1, 0.25 between 1 and 2
    assert recorded.distances("u", [0.75, 0.25])[0, 1] == pytest.approx(
        0.25 * (exact[0, 1] + exact[0, 2] + exact[1, 1] + exact[1, 2]))
    assert recorded.distances("u", [0.75, 0.25])[1, 1] == 0.0  # no distance from itself
    assert recorded.weights_at([0.75, 1.5, -1.0]) == pytest.approx([0.5, 0.0, 2.0])  # held at the ends
    assert NoiseLevelDistances.from_json(recorded.to_json()) == recorded


def test_bac_block_granularity_reuses_block_deltas(tmp_path):
    pipe = TinyPipe()
    path = str(tmp_path / "blocks.json")
    config = BACConfig(updates=2, bubbling=0, granularity="block")
    schedule = calibrate(pipe, num_inference_steps=6, config=config, calls=[{"class_labels": [1, 2]}], save_to=path)
    assert set(schedule.steps[6]) == {f"transformer_blocks.{i}" for i in range(3)}
    norm_calls = count_calls([b.norm1 for b in pipe.transformer.transformer_blocks])
    base = pipe([1, 2], num_inference_steps=6)
    norm_calls[:] = [0, 0, 0]
    with accel.patch(pipe, config.replace(schedule=path)) as p:
        out = pipe([1, 2], num_inference_steps=6)
        assert p.report().methods["bac"]["compute_fraction"] == pytest.approx(2 / 6, abs=1e-3)
    assert norm_calls == [2, 2, 2]  # whole blocks skipped, modulation included
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    with pytest.raises(accel.ArtifactMismatchError, match="names other cached units"):
        accel.patch(pipe, BACConfig(schedule=path))  # a block schedule with branch granularity


def test_bac_first_order_extrapolates_between_updates():
    from accel.methods.bac import _Cached

    first = _Cached(torch.tensor([1.0, 2.0]), 2, None)
    assert torch.equal(first.estimate(3, order=1), torch.tensor([1.0, 2.0]))  # one point: plain reuse
    second = _Cached((torch.tensor([3.0, 2.0]), None), 4, _Cached((torch.tensor([1.0, 2.0]), None), 2, None))
    value, missing = second.estimate(5, order=1)
    assert torch.equal(value, torch.tensor([4.0, 2.0])) and missing is None
    assert second.estimate(5, order=0)[0] is second.value[0]
    with pytest.raises(ValueError, match=r"BACConfig.order must be an int in \[0, 1\], got 2"):
        BACConfig(order=2)


def test_bac_stack_skips_every_block_on_reused_steps(tmp_path):
    pipe = TinyPipe()
    path = str(tmp_path / "stack.json")
    config = BACConfig(updates=3, granularity="stack")
    schedule = calibrate(pipe, num_inference_steps=8, config=config, calls=[{"class_labels": [1, 2]}], save_to=path)
    updates = schedule.steps[8]["stack"]
    assert list(schedule.steps[8]) == ["stack"] and len(updates) == 3 and updates[0] == 0
    blocks = pipe.transformer.transformer_blocks
    norm_calls = count_calls([b.norm1 for b in blocks])
    base = pipe([1, 2], num_inference_steps=8)
    norm_calls[:] = [0, 0, 0]
    with accel.patch(pipe, config.replace(schedule=path)) as p:
        out = pipe([1, 2], num_inference_steps=8)
        report = p.report().methods["bac"]
    assert norm_calls == [3, 3, 3]  # the whole stack runs only at its update steps
    assert report["compute_fraction"] == pytest.approx(3 / 8, abs=1e-3)
    assert sum("skipped" in row for row in report["per_step"]) == 5
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    assert torch.equal(pipe([1, 2], num_inference_steps=8), base)


def test_schedule_strategies_cover_every_weighting_and_say_how_they_calibrate():
    from accel.methods.bac import Weighting
    from accel.methods.bac_schedule import STRATEGIES, Metric, similarity_matrix
    from accel.methods.bac_stack import StackReuse

    assert set(STRATEGIES) == set(Weighting)
    facts = {w.value: (s.online, s.probes, s.needs_weights) for w, s in STRATEGIES.items()}
    assert facts == {"similarity": (True, False, False), "sensitivity": (False, True, True),
                     "snr": (True, False, True), "pooled": (True, True, True)}
    features = np.random.default_rng(0).normal(size=(5, 8))
    similarity = STRATEGIES[Weighting.SIMILARITY].gain(features, None, Metric.COSINE)
    assert np.array_equal(similarity, similarity_matrix(features, Metric.COSINE))
    weights = [0.0, 1.0, 2.0, 3.0, 4.0]
    assert np.array_equal(STRATEGIES[Weighting.SNR].gain(features, weights, Metric.COSINE),
                          -reuse_error(features, weights))
    with pytest.raises(ValueError, match="needs probed per-step sensitivities"):
        STRATEGIES[Weighting.SENSITIVITY].gain(features, None, Metric.COSINE)
    with accel.patch(TinyPipe(), BACConfig(granularity="stack")) as p:
        assert isinstance(p.handle("bac"), StackReuse)
    with accel.patch(TinyPipe(), BACConfig()) as p:
        assert not isinstance(p.handle("bac"), StackReuse)


def test_step_sensitivity_and_weighted_cost_by_hand():
    features = np.array([[0.0, 0.0], [1.0, 1.0], [1.0, 3.0]])
    # probe errors 2 and 8; feature moves (mean squared) 1 and 2 -> s = [0, 2, 4]
    sensitivity = step_sensitivity({1: 2.0, 2: 8.0}, [features])
    assert sensitivity == pytest.approx([0.0, 2.0, 4.0])
    cost = reuse_error(features, sensitivity)
    assert cost[0, 2] == pytest.approx(4.0 * (1 + 9) / 2) and cost[1, 1] == 0.0


def test_sensitivity_weighting_moves_updates_to_sensitive_steps():
    # features drift evenly; only the last steps matter for the output
    features = np.arange(10, dtype=float)[:, None] * np.ones((1, 4))
    flat = [1.0] * 10
    late = [0.01] * 7 + [100.0] * 3
    spread = schedule_updates(-reuse_error(features, flat), 4)
    assert set(np.diff([*spread, 10])) == {2, 3}  # even segments
    assert schedule_updates(-reuse_error(features, late), 4) == [0, 7, 8, 9]


def test_bac_sensitivity_calibration_probes_each_step(tmp_path):
    pipe = TinyPipe()
    calls = [{"class_labels": [1, 2], "generator": torch.Generator().manual_seed(3)}]
    config = BACConfig(updates=3, granularity="stack", weighting="sensitivity")
    forwards = count_calls([pipe.transformer])
    schedule = calibrate(pipe, num_inference_steps=6, config=config, calls=calls, save_to=str(tmp_path / "s.json"))
    assert forwards == [6 + 5 * 6]  # one recording call, then one probe call per step t >= 1
    sensitivity = schedule.sensitivity[6]
    assert len(sensitivity) == 6 and sensitivity[0] == 0 and all(s > 0 for s in sensitivity[1:])
    assert BACSchedule.load(tmp_path / "s.json").sensitivity == schedule.sensitivity
    with accel.patch(pipe, config.replace(schedule=str(tmp_path / "s.json"))) as p:
        pipe([1, 2], num_inference_steps=6)
        assert p.report().methods["bac"]["compute_fraction"] == pytest.approx(3 / 6, abs=1e-3)
        pipe([1, 2], num_inference_steps=4)  # probed weights interpolated over noise level
        assert "derived over noise level" in p.report().methods["bac"]["schedules"][4]
    with pytest.raises(ValueError, match=r"weighting='sensitivity'\) needs a schedule from"):
        accel.patch(pipe, config)


def test_pooled_probes_recover_a_smooth_sensitivity_curve():
    from accel.methods.bac_schedule import pooled_sensitivity, probe_groups, step_moves

    T = 21
    plan = probe_groups(T, 2)
    assert plan == [list(range(1, 11, 2)), list(range(11, 21, 2))]  # every other step of two spans
    assert probe_groups(3, 5) == [[1], [2]]  # never more groups than steps to probe
    rng = np.random.default_rng(0)
    features = np.cumsum(rng.normal(size=(T, 8)) * np.linspace(2.0, 0.5, T)[:, None], axis=0)
    moves = step_moves([features])
    truth = np.exp(np.linspace(-6, -2, T))  # log-linear over the steps, as an ancestral sampler's
    errors = [sum(truth[t] * moves[t] for t in steps) for steps in plan]
    estimate = pooled_sensitivity(errors, plan, [features])
    assert estimate[0] == 0 and len(estimate) == T
    centres = [round(float(np.mean(steps))) for steps in plan]
    for t in range(centres[0], centres[1] + 1):  # between the centres: the curve, up to the pooling
        assert estimate[t] == pytest.approx(truth[t], rel=0.35)
    assert estimate[1] == estimate[centres[0]] and estimate[-1] == estimate[centres[1]]  # held beyond


def test_bac_pooled_weighting_probes_online_in_three_calls():
    pipe = TinyPipe()
    config = BACConfig(granularity="stack", weighting="pooled", update_fraction=0.5, calibration_steps=10)
    assert config.probe_groups == 2
    forwards = count_calls([pipe.transformer])
    with accel.patch(pipe, config) as p:
        first = pipe([1, 2], num_inference_steps=6, generator=torch.Generator().manual_seed(0))
        assert forwards == [10 + 2 * 10 + 6]  # its own recorded call, two pooled probes, then the call
        facts = p.report().methods["bac"]
        assert facts["calibration_generations"] == 3 and facts["compute_fraction"] == pytest.approx(0.5)
        weights = p.handle("bac").schedule.sensitivity[10]
        assert weights[0] == 0 and all(w > 0 for w in weights[1:])
        pipe([3, 4, 5], num_inference_steps=9, generator=torch.Generator().manual_seed(1))
        again = pipe([1, 2], num_inference_steps=6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(first, again)  # the probes are accel's own calls: no dependence on earlier ones
    with pytest.raises(ValueError, match=r"weighting='pooled'\) probes the pipeline"):
        accel.patch(tiny_dit(), config)
    offline = count_calls([pipe.transformer])
    schedule = calibrate(pipe, num_inference_steps=6, config=config.replace(probe_groups=3),
                         calls=[{"class_labels": [1, 2], "generator": torch.Generator().manual_seed(3)}])
    assert offline == [6 + 3 * 6] and len(schedule.sensitivity[6]) == 6


def test_bac_snr_weighting_calibrates_online_from_the_scheduler():
    from accel.methods.bac_schedule import noise_weights

    pipe = TinyPipe()
    config = BACConfig(granularity="stack", weighting="snr", update_fraction=0.5, calibration_steps=10)
    forwards = count_calls([pipe.transformer.transformer_blocks[0].norm1])
    with accel.patch(pipe, config) as p:
        assert forwards == [0]
        pipe([1, 2], num_inference_steps=6)  # calibrated first (10 steps), then cached, schedule derived
        pipe([1, 2], num_inference_steps=6)
        runtime = p.handle("bac")
        assert p.report().methods["bac"]["calibration_generations"] == 1
    pipe.scheduler.set_timesteps(10)
    expected = noise_weights(pipe.scheduler, 10)
    alphas = pipe.scheduler.alphas_cumprod[pipe.scheduler.timesteps]
    assert expected == pytest.approx(((alphas / (1 - alphas)) ** 0.5).tolist())
    assert expected == sorted(expected)  # later (less noisy) steps weigh more
    assert runtime.schedule.sensitivity[10] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert len(runtime.schedule.derived[6]["stack"]) == 3
    assert forwards == [10 + 3 + 3]
    with pytest.raises(ValueError, match="reads noise levels from the pipeline's scheduler"):
        accel.patch(tiny_dit(), config)


def test_noise_weights_for_flow_matching_and_unknown_schedulers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from accel.methods.bac_schedule import noise_weights

    flow = FlowMatchEulerDiscreteScheduler()
    flow.set_timesteps(4)
    sigmas = flow.sigmas[:4].double()
    assert noise_weights(flow, 4) == pytest.approx(((1 - sigmas) / sigmas).tolist())
    assert noise_weights(flow, 5) is None  # another step count than the scheduler holds
    assert noise_weights(object(), 4) is None
    with pytest.raises(ValueError, match="update_fraction must be > 0"):
        BACConfig(update_fraction=0.0)


def test_bac_transfer_benchmark_runs_on_a_saved_pipeline(tmp_path, capsys):
    from tiny_pipelines import save_pipeline

    from accel.benchmarks.bac_transfer import main

    folder = save_pipeline("dit", tmp_path / "dit")
    spec = "bac:granularity=stack:weighting=snr:update_fraction=0.5:calibration_steps=8"
    assert main(["--model", str(folder), "--method", spec, "--steps", "8", "4", "--samples", "2",
                 "--out", str(tmp_path / "t.md")]) == 0
    text = (tmp_path / "t.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| 8 ") or line.startswith("| 4 ")]
    assert len(rows) == 2 and all(row.rstrip().endswith("| 1 | yes |") for row in rows)
    # at the calibrated step count, the online schedule is the fresh one
    eight = rows[0].split("|")
    assert eight[2].strip() == eight[4].strip()
    with pytest.raises(SystemExit):
        main(["--model", str(folder), "--method", "delta-dit"])


def test_calibration_call_takes_the_call_settings_not_its_inputs():
    from accel.methods.bac_calibrate import calibration_settings

    kwargs = {"prompt": ["a 7"], "negative_prompt": "blurry", "generator": [torch.Generator()], "height": 64,
              "width": 32, "num_frames": 9, "guidance_scale": 4.5, "num_inference_steps": 20,
              "output_type": "pt", "max_sequence_length": 8, "latents": torch.zeros(1),
              "callback_on_step_end": print, "attention_kwargs": {"scale": 1.0}}
    assert calibration_settings(kwargs) == {"height": 64, "width": 32, "num_frames": 9, "guidance_scale": 4.5,
                                            "max_sequence_length": 8}


class NoLabelsPipe(TinyPipe):
    """A pipeline whose call accel cannot build (it takes neither prompts nor class labels)."""

    def __call__(self, conditions, num_inference_steps: int = 10):
        return super().__call__(conditions, num_inference_steps)


def test_bac_falls_back_to_recording_with_one_warning_where_it_cannot_build_a_call():
    pipe = NoLabelsPipe()
    with accel.patch(pipe, "bac:granularity=stack:weighting=snr") as p:
        with pytest.warns(UserWarning, match="cannot build its calibration call"):
            pipe([1, 2], num_inference_steps=6)  # records, uncached
        pipe([1, 2], num_inference_steps=6)  # no second warning; cached by the recorded schedule
        facts = p.report().methods["bac"]
    assert facts["calibration_generations"] == 0 and facts["compute_fraction_last_call"] < 1.0
