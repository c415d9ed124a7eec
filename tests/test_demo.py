"""accel-demo: the app's functions called directly, a launched server driven by gradio_client, a real browser.

One model cache and one server serve the whole module, so the embedded digits-dit loads and warms up
once; comparisons run at 6 steps on 2 samples to keep the file well under a minute and a half.
"""

from __future__ import annotations

import shutil
import socket
import threading
from pathlib import Path

import gradio as gr
import pytest
import torch

import accel
from accel.benchmarks.workloads import Workload
from accel.demos import app, compare, render

MODEL = "digits-dit"
FAST = {"steps": 6, "seed": 0, "label": 3, "samples": 2, "guidance_scale": 4.0, "repeats": 1}
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _run(cache: compare.ModelCache, method: str, settings: str = "", **overrides) -> tuple:
    args = {**FAST, **overrides}
    return app.run_compare(MODEL, method, settings, args["steps"], args["seed"], args["label"], args["samples"],
                           args["guidance_scale"], args["repeats"], [], cache)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache() -> compare.ModelCache:
    return compare.ModelCache()


# --- the app's functions, called directly -------------------------------------------------------------


def test_compare_direct_shows_both_outputs_and_numbers(cache):
    base, fast, strip, numbers, status, details, table, pareto, history = _run(cache, "delta-dit", "interval=2")
    assert base.size == fast.size and base.width > 2 * base.height  # two 16 px digits enlarged side by side
    assert "done" in status
    assert strip["visible"] is False  # the frame strip is for video only
    record = details["record"]
    assert record["recipe"] == "delta-dit:interval=2" and record["steps"] == 6
    assert record["baseline_s"] > 0 and record["accelerated_s"] > 0 and record["speedup"] > 0
    assert record["psnr_db"] is None or record["psnr_db"] > 0
    assert 0 < record["ssim"] <= 1
    for text in ("Speedup", "PSNR", "SSIM", "Judge accuracy", f"{record['speedup']:.2f}×"):
        assert text in numbers
    assert len(table) == 1 and len(history) == 1 and table[0][2] == "delta-dit:interval=2"
    assert pareto.axes[0].get_xlabel().startswith("speedup")
    assert accel.active_patch(cache.get(MODEL).pipe) is None  # nothing left attached after the run


def test_no_state_leaks_between_requests(cache):
    """After an accelerated run the model is exactly the baseline again: 'none' is bit-identical to it."""
    small = {**FAST, "steps": 3, "samples": 1}
    first = compare.compare(compare.CompareRequest(model=MODEL, recipe="delta-dit", **small), cache)
    second = compare.compare(compare.CompareRequest(model=MODEL, recipe="none", **small), cache)
    assert torch.equal(first.baseline, second.baseline) and torch.equal(second.baseline, second.accelerated)
    assert second.record()["psnr_db"] is None and second.ssim == 1.0


@pytest.mark.parametrize(("method", "settings", "message"), [
    ("delta-dit", "interval=0", r"DeltaDiTConfig\.interval must be an int >= 1, got 0"),
    ("delta-dit", "speed=2", r"DeltaDiTConfig has no setting 'speed'\. Accepted: .*interval"),
    ("delta-dit", "interval", r"settings are written key=value"),
    ("none", "interval=2", r"'none' \(the unaccelerated baseline\) takes no settings"),
    ("delta-dit", "delta_dit:interval=2", r"Unknown method 'delta_dit'\. Did you mean 'delta-dit'\?"),
])
def test_bad_settings_give_a_readable_error(cache, method, settings, message):
    with pytest.raises(gr.Error, match=message) as info:
        _run(cache, method, settings)
    assert "Traceback" not in str(info.value)


def test_bad_model_and_numbers_give_a_readable_error(cache, tmp_path):
    with pytest.raises(gr.Error, match=r"No such model folder: .*nope"):
        app.run_compare(str(tmp_path / "nope"), "delta-dit", "", 6, 0, 3, 2, 4.0, 1, [], cache)
    with pytest.raises(gr.Error, match=r"Label must be a whole number from 0 to 9, got 12"):
        _run(cache, "delta-dit", label=12)
    with pytest.raises(gr.Error, match=r"Seed is empty"):
        _run(cache, "delta-dit", seed=None)


def test_patch_is_removed_when_a_run_fails(cache, monkeypatch):
    """A failure mid-run (here: inside the accelerated call) still removes the patch."""
    real_apply = compare.apply_method

    def failing_apply(method, workload, calibration):
        applied = real_apply(method, workload, calibration)
        applied.before_call = lambda: (_ for _ in ()).throw(RuntimeError("boom"))
        return applied

    monkeypatch.setattr(compare, "apply_method", failing_apply)
    with pytest.raises(gr.Error, match=r"Unexpected RuntimeError: boom"):
        _run(cache, "delta-dit", steps=2, samples=1)
    assert accel.active_patch(cache.get(MODEL).pipe) is None


def test_bac_calibrates_before_the_timed_call(cache, monkeypatch):
    """BAC's own calibration call runs in ``Patch.prepare``, before the accelerated call is timed."""
    seen = []
    real_prepare = accel.Patch.prepare

    def spying_prepare(self, *args, **kwargs):
        real_prepare(self, *args, **kwargs)
        seen.append((kwargs["num_inference_steps"], self.report().methods["bac"]["calibration_generations"]))

    monkeypatch.setattr(accel.Patch, "prepare", spying_prepare)
    outputs = _run(cache, "bac", steps=4, samples=1)
    assert seen == [(4, 1)]  # calibrated before the timed call, which then had nothing left to calibrate
    assert outputs[5]["report"]["calibration_generations"] == 1


def test_concurrent_requests_never_share_a_model_mid_run(cache, monkeypatch):
    in_flight, peak, guard = [0], [0], threading.Lock()
    real_run = Workload.run_batch

    def counting_run(self, batch):
        with guard:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        try:
            return real_run(self, batch)
        finally:
            with guard:
                in_flight[0] -= 1

    monkeypatch.setattr(Workload, "run_batch", counting_run)
    results, errors = [], []

    def worker(recipe: str) -> None:
        try:
            results.append(compare.compare(compare.CompareRequest(model=MODEL, recipe=recipe, **{
                **FAST, "steps": 2, "samples": 1}), cache))
        except Exception as exc:  # noqa: BLE001 - surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(r,)) for r in ("delta-dit", "delta-dit:interval=3")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 2 and peak[0] == 1


def test_local_model_folder(tmp_path):
    """A local diffusers folder loads like an embedded name (random-init tiny DiT: structure only)."""
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    from accel.pipelines.digits_dit import DigitsDiTPipeline

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                                        num_layers=2, sample_size=16, patch_size=4, num_embeds_ada_norm=10,
                                        norm_num_groups=1)
    DigitsDiTPipeline(transformer, DDIMScheduler(num_train_timesteps=1000)).save_pretrained(tmp_path)
    result = compare.compare(compare.CompareRequest(model=str(tmp_path), recipe="delta-dit", **{
        **FAST, "steps": 2, "samples": 1}), compare.ModelCache())
    assert result.baseline.shape == (1, 1, 16, 16) and result.kind == "image"


def test_text_pipeline_folder_with_a_prompt(tmp_path):
    """A saved PixArt folder: the prompt box appears for it, a run takes the prompt and the size, shows RGB
    outputs, and an empty prompt is refused with a message."""
    from tiny_pipelines import save_pipeline

    folder = save_pipeline("pixart", tmp_path / "pixart")
    assert compare.is_text_model(str(folder)) and not compare.is_text_model(MODEL)
    cache = compare.ModelCache()
    # The tiny model's 8 px side is not one of PixArt's aspect-ratio bins: ask for no binning.
    assert type(cache.get(str(folder)).pipe).__name__ == "PixArtAlphaPipeline"  # diffusers' own class
    request = compare.CompareRequest(model=str(folder), recipe="bac", prompt="a red fox", height=8, width=8,
                                     **{**FAST, "steps": 3, "samples": 2})
    cache.get(str(folder)).extra.update(use_resolution_binning=False, max_sequence_length=16)
    result = compare.compare(request, cache)
    assert result.baseline.shape == (2, 3, 8, 8) and result.judge_baseline is None
    assert result.record()["label"] == "a red fox" and result.record()["height"] == 8
    assert app.views(result)[0].mode == "RGB"
    with pytest.raises(compare.DemoError, match="text-to-image pipeline: type a prompt"):
        compare.compare(compare.CompareRequest(model=str(folder), recipe="bac", **FAST), cache)


def test_recipe_box_and_render_helpers():
    assert compare.build_recipe("delta-dit", "interval = 3, warmup_steps=1") == "delta-dit:interval=3:warmup_steps=1"
    assert compare.build_recipe("bac", "delta-dit:interval=3") == "delta-dit:interval=3"  # a whole recipe wins
    assert compare.build_recipe("none", "") == "none"
    assert compare.build_recipe("delta-dit", "bac") == "bac"
    assert compare.build_recipe("delta-dit", "interval") == "delta-dit:interval"  # -> "settings are key=value"
    assert render.pareto_front([(1.0, 50.0), (2.0, 30.0), (1.5, 20.0), (3.0, 10.0)]) == [0, 1, 3]
    video = torch.rand(2, 5, 32, 32)
    gif = render.video_gif(video)
    from PIL import Image

    with Image.open(gif) as im:
        assert im.format == "GIF" and im.n_frames == 5
    assert render.frame_strip(video, video).height > 2 * 64
    assert (app.model_guidance("digits-pixart"), app.model_guidance("digits-dit")) == (4.5, 4.0)
    assert app.model_guidance("/a/local/folder") == 4.0 and app.DEFAULT_MODEL == "digits-pixart"
    args = app.build_parser().parse_args([])
    assert (args.host, args.share) == ("127.0.0.1", False)


# --- a launched server -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(cache):
    demo = app.build_app(cache)
    port = _free_port()
    app.launch(demo, host="127.0.0.1", port=port, block=False)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def test_server_end_to_end_with_gradio_client(server, tmp_path):
    from gradio_client import Client

    client = Client(server, verbose=False, download_files=str(tmp_path), analytics_enabled=False)
    outputs = client.predict(MODEL, "delta-dit", "interval=2", 6, 0, 3, 2, 4.0, 1, api_name="/compare")
    base, fast, _strip, numbers, _status, details = outputs[:6]
    assert Path(base).is_file() and Path(fast).is_file()
    assert "Speedup" in numbers and details["record"]["speedup"] > 0
    failed = client.predict(MODEL, "delta-dit", "speed=2", 6, 0, 3, 2, 4.0, 1, api_name="/compare")
    assert "Cannot run this comparison:** DeltaDiTConfig has no setting 'speed'" in failed[4]  # the status box
    assert r"warmup\_steps" in failed[4]  # escaped for Markdown


# --- a real browser --------------------------------------------------------------------------------------

BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--no-first-run"]


def test_browser_runs_a_comparison(server, tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed; run .ci/install-browser.sh (Debian's chromium package)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the [test] extra) is not installed")

    with sync_api.sync_playwright() as p:
        # headless=True makes Playwright pass --headless; a fresh profile per run.
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS,
            viewport={"width": 1400, "height": 1100})
        try:
            page = context.new_page()
            page.goto(server, wait_until="domcontentloaded")
            page.locator("#compare-button").wait_for(timeout=30_000)
            # It opens on the embedded text-to-image default, its prompt box filled with the model's first
            # prompt (its guidance, in the closed "More settings", starts at app.model_guidance's).
            assert page.locator("#prompt textarea").input_value() == compare.first_prompt("digits-pixart")
            steps = page.locator("#steps input[type=number]")
            steps.fill("6")
            steps.press("Enter")
            page.locator("#settings textarea").fill("interval=2")
            page.locator("#compare-button").click()
            numbers = page.locator("#numbers")
            numbers.get_by_text("Speedup").wait_for(timeout=60_000)
            text = numbers.inner_text()
            assert "6 steps" in text and "PSNR" in text and "SSIM" in text and "×" in text
            for side in ("#baseline-output", "#accelerated-output"):
                image = page.locator(f"{side} img")
                image.wait_for(timeout=10_000)
                assert page.evaluate("(img) => img.complete && img.naturalWidth > 0", image.element_handle())
            assert "delta-dit:interval=2" in page.locator("#history").inner_text()
            page.locator("#status").get_by_text("done").wait_for(timeout=10_000)
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "demo.png"), full_page=True)

            page.locator("#settings textarea").fill("interval=0")
            page.locator("#compare-button").click()
            page.locator("#status").get_by_text("DeltaDiTConfig.interval must be an int >= 1").wait_for(timeout=20_000)
            page.screenshot(path=str(ARTIFACTS / "demo-error.png"))
            assert "Speedup" in numbers.inner_text()  # a failed request leaves the last results on screen
        finally:
            context.close()
