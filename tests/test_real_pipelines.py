"""accel on real diffusers pipelines of every family, as users run them: saved to a folder, benchmarked
with prompts, patched with the default recipe, calibrated with prompts, and removed without a trace.

The pipelines are tiny and random-init (``tiny_pipelines``), so quality numbers mean nothing here; the
tests check behaviour: calls build, steps are tracked, compute is skipped, removal is exact.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from tiny_pipelines import FAMILIES, build_pipeline, call_kwargs, save_pipeline

import accel
import accel.registry
from accel.benchmarks.cli import main as bench_main
from accel.calls import build_call, call_signature, default_calls

pytestmark = pytest.mark.usefixtures("one_thread")

VIDEO = {"wan", "cogvideox", "ltx", "hunyuan-video"}
#: Call settings the tiny models need (sizes below their defaults, short prompts, no resolution bins).
DRIVEN = ("num_inference_steps", "output_type", "prompt", "class_labels", "guidance_scale", "height", "width",
          "num_frames")


def _extra(family: str) -> dict:
    """The tiny family's call settings other than what the driver builds itself."""
    return {k: v for k, v in call_kwargs(family).items() if k not in DRIVEN}


def _sizes(family: str) -> dict:
    kw = call_kwargs(family)
    return {k: kw[k] for k in ("height", "width", "num_frames") if k in kw}


def _conditions(family: str, count: int = 2) -> list:
    return [1, 7][:count] if family == "dit" else ["a red fox in snow", "a blue car"][:count]


def _run(pipe, family: str, steps: int = 3, count: int = 2, **overrides) -> torch.Tensor:
    from accel.pipelines import generate

    kw = {**_sizes(family), **_extra(family), **overrides}
    return generate(pipe, _conditions(family, count), list(range(count)), steps, **kw)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipelines")
    return {family: save_pipeline(family, root / family) for family in FAMILIES}


def _bench_args(family: str, folder: Path, methods: str, out: Path, prompts: Path) -> list[str]:
    args = ["--model", str(folder), "--methods", methods, "--steps", "4", "--repeats", "1", "--warmup", "0",
            "--out", str(out)]
    args += ["--labels", "1,2"] if family == "dit" else ["--prompts", str(prompts)]
    for key, value in _sizes(family).items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    for key, value in _extra(family).items():
        args += ["--call-arg", f"{key}={json.dumps(value)}"]
    return args


def _methods(family: str) -> str:
    methods = ["none", "bac", "quest:finetune_iters=0:calib_seeds=1"]
    if family != "sd":
        methods.append("delta-dit:interval=2")
    if family in VIDEO:
        methods.append("adaspa")
    return ",".join(methods)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_bench_runs_a_saved_pipeline_with_prompts(family, folders, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox in snow\n\n# a comment\na blue car\n")
    out = tmp_path / "out"
    assert bench_main(_bench_args(family, folders[family], _methods(family), out, prompts)) == 0
    results = json.loads((out / "results.json").read_text())
    records = {r["method"]: r for r in results["records"]}
    assert set(records) == {m.split(":")[0] for m in _methods(family).split(",")}
    for method, record in records.items():
        assert record["error"] is None, (method, record["error"])
        assert record["latency_s"] > 0 and record["speedup"] > 0 and record["judge_acc"] is None
    assert records["bac"]["compute_fraction"] < 1.0  # the calibrated schedule skips steps
    if family != "dit":
        assert results["environment"]["prompts"] == ["a red fox in snow", "a blue car"]
        assert records["none"]["batch"] == (1 if family in VIDEO else 10)  # images: both prompts in one call
    assert (out / f"grid-{family}.png").is_file()


@pytest.mark.parametrize("family", FAMILIES)
def test_default_patch_follows_calls_and_removes_exactly(family):
    """The default recipe on every family: calls that change steps, batch and size work, compute is
    skipped, and after remove() the pipeline gives bit-identical outputs again."""
    pipe = build_pipeline(family)
    reference = _run(pipe, family, steps=4)
    denoiser = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    blocks = accel.registry.find_adapter(denoiser).blocks()
    calls = {"n": 0}
    # A skipped block or branch is still called (its hook returns the cached value); its projections are not.
    inner = [b.self_attn.to_q for b in blocks]
    counters = [m.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1)) for m in inner]
    try:
        _run(pipe, family, steps=4)
        full = calls["n"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            patch = accel.patch(pipe)
        _run(pipe, family, steps=4)  # one calibration call with these settings first, then cached
        calls["n"] = 0
        first = _run(pipe, family, steps=4)
        assert calls["n"] < full, "the default recipe ran every block"
        facts = patch.report().methods["bac"]
        assert facts["calibration_generations"] == 1
        assert facts["compute_fraction_last_call"] == facts["compute_fraction"] < 1.0
        _run(pipe, family, steps=3, count=1)  # another step count and batch
        size = {k: v * 2 for k, v in _sizes(family).items() if k in ("height", "width")}
        if size:
            _run(pipe, family, steps=2, count=1, **size)
        assert patch.report().steps_seen > 0
        assert torch.equal(_run(pipe, family, steps=4), first)  # whatever ran in between
        patch.remove()
    finally:
        for handle in counters:
            handle.remove()
    assert torch.equal(_run(pipe, family, steps=4), reference)


@pytest.mark.parametrize("family", ["sd3", "flux", "hunyuan-video", "pixart"])
def test_custom_sigmas_and_timesteps_pass_through_a_patch(family):
    """diffusers' retrieve_timesteps reads set_timesteps' signature: the wrapper must keep it."""
    pipe = build_pipeline(family)
    custom = {"sigmas": [1.0, 0.7, 0.4, 0.1]} if family in ("sd3", "flux", "hunyuan-video") else \
        {"timesteps": [900, 600, 300, 100]}
    kw = {**_sizes(family), **_extra(family), **custom}
    plain = _run(pipe, family, steps=None, **kw)
    with accel.patch(pipe, "bac:granularity=branch") as patch:
        patched = _run(pipe, family, steps=None, **kw)
        assert patch.report().steps_seen == 4
    assert patched.shape == plain.shape and torch.isfinite(patched).all()


@pytest.mark.parametrize("family", ["pixart", "wan", "dit"])
def test_calibration_runs_on_prompts(family, tmp_path):
    """BAC schedules, QuEST and HierarchicalPrune's distillation take the same calls the benchmark makes."""
    from accel.methods import quest
    from accel.methods.bac import calibrate
    from accel.methods.hierarchical_prune import HierarchicalPruneConfig, prune
    from accel.prune.distill import record_inputs

    pipe = build_pipeline(family)
    calls = default_calls(pipe, seeds=[5], steps=3, **_sizes(family), **_extra(family))
    assert call_signature(pipe).conditioning in calls[0]
    schedule = calibrate(pipe, num_inference_steps=3, config=accel.BACConfig(), calls=calls,
                         save_to=tmp_path / "s")
    assert set(schedule.steps) == {3}
    conditioning = call_signature(pipe).conditioning
    assert (schedule.call["conditioning"] == conditioning
            and schedule.call["batch"] == len(calls[0][conditioning]))
    qconfig = quest.QuESTConfig(finetune_iters=0, calib_steps=3)
    qm = quest.finetune(pipe, quest.calibrate(pipe, qconfig, calls=calls, progress=False), qconfig,
                        progress=False)
    assert qm.meta["calibration"]["call"]["num_inference_steps"] == 3
    with accel.patch(pipe, qconfig.replace(artifact=str(qm.save(tmp_path / "q")))):
        assert torch.isfinite(_run(pipe, family, steps=3)).all()
    model = pipe.transformer
    if len(accel.registry.find_adapter(model).blocks()) > 1:
        config = HierarchicalPruneConfig(ratio=0.5, protect_first=0.0, distill_steps=2)
        result = prune(pipe, config, analyze=False, pool=record_inputs(pipe, calls), save_to=tmp_path / "p",
                       progress=False)
        assert result.removed and (tmp_path / "p").is_dir()


def test_driver_builds_calls_from_the_signature():
    pipe = build_pipeline("pixart")
    kw = build_call(pipe, ["a", "b"], [0, 1], 5, 3.0, negative_prompt="blurry", height=8, width=8)
    assert kw["prompt"] == ["a", "b"] and kw["negative_prompt"] == ["blurry", "blurry"]
    assert kw["num_inference_steps"] == 5 and kw["guidance_scale"] == 3.0 and kw["output_type"] == "pt"
    assert len(kw["generator"]) == 2 and (kw["height"], kw["width"]) == (8, 8)
    with pytest.raises(ValueError, match=r"conditioned on prompt: pass prompts \(str\), got 3"):
        build_call(pipe, [3], [0])
    dit = build_pipeline("dit")
    assert "prompt" not in build_call(dit, [1], [0], height=64)  # DiT has no size argument
    with pytest.raises(ValueError, match="takes no negative_prompt"):
        build_call(dit, [1], [0], negative_prompt="x")


def test_driver_avoids_what_the_pipeline_would_refuse(tmp_path):
    """PixArt bins resolutions only for sample sizes 32-256 ("Invalid sample size" otherwise); a small
    model is called without binning, a binned one keeps the pipeline's default. A folder's prompts.txt
    gives the default prompts."""
    from accel.calls import DEFAULT_PROMPTS, default_conditions, folder_prompts

    pipe = build_pipeline("pixart")
    assert build_call(pipe, ["a"], [0])["use_resolution_binning"] is False
    images = _run_default(pipe)
    assert images.shape == (1, 3, 8, 8) and torch.isfinite(images).all()
    pipe.transformer.register_to_config(sample_size=64)
    assert "use_resolution_binning" not in build_call(pipe, ["a"], [0])
    assert build_call(pipe, ["a"], [0], use_resolution_binning=False)["use_resolution_binning"] is False
    folder = save_pipeline("pixart", tmp_path / "pixart")
    (folder / "prompts.txt").write_text("a thin 3\n\n  a thick 8  \n")
    saved = accel.pipelines.load(folder)
    assert folder_prompts(saved) == ["a thin 3", "a thick 8"]
    assert default_conditions(saved) == ["a thin 3", "a thick 8"]
    assert folder_prompts(pipe) is None and default_conditions(pipe, 2) == list(DEFAULT_PROMPTS[:2])


def _run_default(pipe) -> torch.Tensor:
    from accel.pipelines import generate

    return generate(pipe, ["a red fox"], [0], 2, height=8, width=8, max_sequence_length=8)


def test_one_sample_depends_only_on_its_seed():
    pipe = build_pipeline("flux")
    both = _run(pipe, "flux", steps=2, count=2)
    alone = _run(pipe, "flux", steps=2, count=1)
    assert torch.allclose(both[:1], alone, atol=1e-5)


def _bench_error(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as info:
        bench_main(args)
    assert info.value.code == 2
    return capsys.readouterr().err


def test_bench_refuses_bad_inputs_in_one_line(tmp_path, folders, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    err = _bench_error(["--model", str(folders["pixart"]), "--prompts", str(empty)], capsys)
    assert "has no prompts" in err and "Traceback" not in err
    err = _bench_error(["--call-arg", "guidance_scale=3"], capsys)
    assert "use --guidance-scale" in err
    assert bench_main(["--model", str(tmp_path), "--methods", "none"]) == 2  # no model_index.json
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a model folder" in err
    img2img = tmp_path / "img2img"
    pipe = build_pipeline("sd")
    from diffusers import StableDiffusionImg2ImgPipeline

    StableDiffusionImg2ImgPipeline(**pipe.components).save_pretrained(img2img)
    capsys.readouterr()
    assert bench_main(["--model", str(img2img), "--methods", "none", "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "takes image" in err and "Traceback" not in err and err.count("\n") == 1
    assert bench_main(["--model", str(folders["dit"]), "--methods", "none,delt-dit"]) == 2
    assert "Did you mean 'delta-dit'" in capsys.readouterr().err


@pytest.mark.slow
def test_sweep_with_a_quality_floor_on_a_saved_pipeline(folders, tmp_path):
    """--sweep / --min-psnr on a checkpoint: calibration runs on prompts, one point per family is selected."""
    out = tmp_path / "sweep"
    args = _bench_args("pixart", folders["pixart"], "none,delta-dit,bac", out, tmp_path / "unused")
    args = [a for a in args if a != str(tmp_path / "unused") and a != "--prompts"]
    assert bench_main([*args, "--sweep", "--min-psnr", "30"]) == 0
    records = json.loads((out / "results.json").read_text())["records"]
    assert len(records) > 3 and all(r["error"] is None for r in records)
    # The Δ-DiT grid's 4-block points do not fit this 2-block model: left out of the sweep.
    assert not any("cached_blocks=4" in r["settings"] for r in records)
    selected = [r["method"] for r in records if r["selected"]]
    assert sorted(selected) == ["bac", "delta-dit", "none"]
    assert (out / "pareto.png").stat().st_size > 0


def test_bench_refuses_a_device_this_machine_lacks(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert bench_main(["--device", "cuda", "--methods", "none"]) == 2
    assert "--device 'cuda' is not available here; accepted: cpu (no CUDA device" in capsys.readouterr().err
