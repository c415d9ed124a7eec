"""``accel-demo``: a Gradio app that shows baseline and accelerated outputs side by side, with the numbers.

    accel-demo                       # http://127.0.0.1:7860, loopback only
    accel-demo --host 0.0.0.0 --port 8080

Pick a model (an embedded generator or a local diffusers folder), a method or a composed recipe with
its settings (the ``accel-bench --methods`` syntax), steps, seed and a prompt (text pipelines) or class
label, and optionally the size and frame count; Compare runs the
baseline and the accelerated pipeline on the same seeds and shows both outputs, each latency, the
speedup, PSNR/SSIM against the baseline and the judge's accuracy. Every run of the session goes into a
history table and a speedup-vs-PSNR Pareto plot.

Runs are queued one at a time (timings of two runs sharing two CPU cores would mean nothing), and each
cached model has a lock, so no two requests ever share a patched model; the patch is removed in
``finally``. Nothing is sent anywhere: analytics are off and ``--share`` is off unless asked for.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Any

from accel.demos import render
from accel.demos.compare import (
    MAX_REPEATS,
    MAX_SAMPLES,
    MAX_STEPS,
    CompareRequest,
    CompareResult,
    DemoError,
    ModelCache,
    build_recipe,
    compare,
    first_prompt,
    generator_names,
    is_text_model,
    method_choices,
)

from accel.errors import AccelError
from accel.extras import require

gr = require("gradio", "demo", "accel-demo")

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "digits-pixart"
DEFAULT_METHOD = "delta-dit"
#: Errors whose message is written for the user: shown as is, without a traceback.
USER_ERRORS = (DemoError, AccelError, ValueError, TypeError, FileNotFoundError, ConnectionError)


def run_compare(
    model: str, method: str, settings: str, steps: float, seed: float, label: float, samples: float,
    guidance_scale: float, repeats: float, history: list[dict[str, Any]] | None, cache: ModelCache,
    progress: Any = None, prompt: str = "", negative_prompt: str = "", height: float | None = 0,
    width: float | None = 0, num_frames: float | None = 0,
) -> tuple[Any, ...]:
    """The Compare button: one comparison, then what the page shows: (baseline view, accelerated view,
    frame strip update, numbers, status, details, history rows, Pareto figure, history).

    Bad input raises ``gr.Error`` with a readable message (Gradio shows it in a message box).
    """
    history = list(history or [])
    started = time.perf_counter()
    try:
        request = CompareRequest(
            model=(model or "").strip(), recipe=build_recipe(method, settings), steps=_whole(steps, "Steps"),
            seed=_whole(seed, "Seed"), label=_whole(label, "Label"), samples=_whole(samples, "Samples"),
            guidance_scale=float(guidance_scale), repeats=_whole(repeats, "Repeats"),
            prompt=(prompt or "").strip(), negative_prompt=(negative_prompt or "").strip(),
            height=_whole(height or 0, "Height"), width=_whole(width or 0, "Width"),
            num_frames=_whole(num_frames or 0, "Frames"),
        )
        result = compare(request, cache, _progress_fn(progress))
    except USER_ERRORS as exc:
        logger.debug("accel-demo: request refused", exc_info=True)
        raise gr.Error(str(exc), title="Cannot run this comparison", print_exception=False) from None
    except Exception as exc:  # a bug, not a bad setting: log it in full, show one line
        logger.exception("accel-demo: comparison failed")
        raise gr.Error(f"Unexpected {type(exc).__name__}: {exc}. The server log has the details.",
                       title="Comparison failed", print_exception=False) from None
    record = result.record()
    history.append(record)
    base_view, fast_view, strip = views(result)
    details = {"record": record, "report": result.report}
    status = f"Run {len(history)} done in {time.perf_counter() - started:.1f} s: `{request.recipe}` on `{request.model}`."
    return (base_view, fast_view, gr.update(value=strip, visible=strip is not None), render.metrics_markdown(record),
            status, details, render.history_rows(history), render.pareto_figure(history), history)


def error_status(error: gr.Error) -> str:
    """A ``gr.Error`` as Markdown for the status box (the message escaped: ``warmup_steps`` is not italics)."""
    import re

    message = re.sub(r"([\\`*_{}\[\]<>#|~])", r"\\\1", str(error.message))
    return f"**⚠️ {getattr(error, 'title', 'Error')}:** {message}"


def _whole(value: Any, name: str) -> int:
    """Numbers from sliders and number boxes arrive as floats (or None when a box is emptied)."""
    if value is None or value == "":
        raise DemoError(f"{name} is empty; enter a whole number.")
    number = float(value)
    if not number.is_integer():
        raise DemoError(f"{name} must be a whole number, got {value!r}.")
    return int(number)


def _progress_fn(progress: Any) -> Any:
    if progress is None:
        return None
    return lambda fraction, desc: progress(fraction, desc=desc)


def views(result: CompareResult) -> tuple[Any, Any, Any]:
    """(baseline view, accelerated view, frame strip or None): enlarged rows for images, GIFs for video."""
    if result.kind == "video":
        return (render.video_gif(result.baseline), render.video_gif(result.accelerated),
                render.frame_strip(result.baseline, result.accelerated))
    return render.image_grid(result.baseline), render.image_grid(result.accelerated), None


def model_guidance(name: str | None) -> float:
    """The guidance an embedded generator's reported figures use (digits-pixart 4.5, the digit DiTs 4.0);
    4.0 for anything else."""
    from accel.pipelines import reported_setting

    return float(reported_setting(name, "guidance_scale", 4.0))


def clear_history() -> tuple[list[list[Any]], Any, list[dict[str, Any]]]:
    return [], render.pareto_figure([]), []


def methods_markdown() -> str:
    """Every name the recipe box accepts, with its status (unavailable baselines say why)."""
    from accel.benchmarks.spec import available_names

    rows = [f"| `{name}` | {status} |" for name, status in available_names().items()]
    intro = ("Recipes use the `accel-bench --methods` syntax: `name:key=value:key=value`, composed with `+` "
             "(e.g. `delta-dit:interval=3+bac`). Type settings for the chosen method (`interval=3`) or a whole "
             "recipe in the settings box.")
    return "\n".join([intro, "", "| name | status |", "|---|---|", *rows])


def build_app(cache: ModelCache | None = None) -> gr.Blocks:
    """The Blocks app; ``cache`` holds loaded models for the life of the process (one per app by default)."""
    cache = cache or ModelCache()
    models = generator_names()
    methods = method_choices()
    start_model = DEFAULT_MODEL if DEFAULT_MODEL in models else None
    start_text = bool(start_model) and is_text_model(start_model)

    def on_compare(model, method, settings, steps, seed, label, samples, guidance_scale, repeats, history,
                   prompt, negative_prompt, height, width, num_frames,
                   progress=gr.Progress()):  # noqa: B008 - Gradio injects the tracker through this default
        try:
            return run_compare(model, method, settings, steps, seed, label, samples, guidance_scale, repeats,
                               history, cache, progress, prompt, negative_prompt, height, width, num_frames)
        except gr.Error as exc:  # into the status box; the last results stay on screen
            return (*[gr.skip()] * 4, error_status(exc), *[gr.skip()] * 4)

    with gr.Blocks(title="accel demo", analytics_enabled=False) as demo:
        gr.Markdown("# accel: baseline vs accelerated\nSame model, same seeds: the unaccelerated pipeline on the "
                    "left, the chosen recipe on the right.")
        history = gr.State([])
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                model = gr.Dropdown(models, value=start_model, label="Model",
                                    allow_custom_value=True, info="An embedded generator, or a local diffusers folder.")
                method = gr.Dropdown(methods, value=DEFAULT_METHOD if DEFAULT_METHOD in methods else methods[0],
                                     label="Method", info="'none' compares the baseline with itself.")
                prompt = gr.Textbox(value=first_prompt(start_model) if start_text else "", label="Prompt",
                                    placeholder="a thick handwritten 7, slanted right, small, top left",
                                    visible=start_text, info="Text-to-image/video pipelines.", elem_id="prompt")
                settings = gr.Textbox(label="Settings", placeholder="interval=3   or a recipe: delta-dit:interval=3+bac",
                                      info="key=value pairs for the method, or a whole recipe.", elem_id="settings")
                steps = gr.Slider(1, MAX_STEPS, value=20, step=1, label="Steps", elem_id="steps")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, minimum=0, label="Seed")
                    label = gr.Slider(0, 9, value=3, step=1, label="Digit label", visible=not start_text)
                with gr.Accordion("More settings", open=False):
                    samples = gr.Slider(1, MAX_SAMPLES, value=4, step=1, label="Samples (seeds seed, seed+1, ...)",
                                        elem_id="samples")
                    guidance_scale = gr.Slider(0, 15, value=model_guidance(start_model), step=0.5,
                                               label="Guidance scale", elem_id="guidance")
                    repeats = gr.Slider(1, MAX_REPEATS, value=1, step=1, label="Timed repeats (median)")
                    negative_prompt = gr.Textbox(value="", label="Negative prompt", visible=start_text,
                                                 elem_id="negative-prompt")
                    with gr.Row():
                        height = gr.Number(value=0, precision=0, minimum=0, label="Height (0: model default)")
                        width = gr.Number(value=0, precision=0, minimum=0, label="Width (0: model default)")
                        num_frames = gr.Number(value=0, precision=0, minimum=0,
                                               label="Frames (video; 0: default)")
                run = gr.Button("Compare", variant="primary", elem_id="compare-button")
                # Progress and errors show here (and errors in a message box), so a failed request leaves
                # the previous results on screen.
                status = gr.Markdown("", min_height=48, elem_id="status")
            with gr.Column(scale=2):
                with gr.Row():
                    baseline = gr.Image(label="Baseline", format="png", interactive=False, height=300,
                                        elem_id="baseline-output")
                    accelerated = gr.Image(label="Accelerated", format="png", interactive=False, height=300,
                                           elem_id="accelerated-output")
                strip = gr.Image(label="Frames: baseline (top), accelerated (bottom)", format="png", visible=False,
                                 interactive=False, elem_id="frame-strip")
                with gr.Row():
                    numbers = gr.Markdown("Press **Compare** to run.", elem_id="numbers")
                    pareto = gr.Plot(value=render.pareto_figure([]), label="Speedup vs PSNR (this session)",
                                     format="png", elem_id="pareto")
        table = gr.Dataframe(headers=render.HISTORY_COLUMNS, value=[], label="This session's runs",
                             interactive=False, elem_id="history")
        clear = gr.Button("Clear history", size="sm")
        with gr.Accordion("Details of the last run (settings, patch report)", open=False):
            details = gr.JSON(elem_id="details")
        with gr.Accordion("Methods and recipe syntax", open=False):
            gr.Markdown(methods_markdown())

        def on_model(name: str, current: str) -> tuple[Any, Any, Any, Any]:
            text = is_text_model(name)
            value = (current or first_prompt(name)) if text else current
            return (gr.update(visible=text, value=value), gr.update(visible=text),
                    gr.update(visible=not text), gr.update(value=model_guidance(name)))

        model.change(on_model, inputs=[model, prompt],
                     outputs=[prompt, negative_prompt, label, guidance_scale], api_name=False)
        run.click(on_compare, inputs=[model, method, settings, steps, seed, label, samples, guidance_scale, repeats,
                                      history, prompt, negative_prompt, height, width, num_frames],
                  outputs=[baseline, accelerated, strip, numbers, status, details, table, pareto, history],
                  api_name="compare", concurrency_limit=1, show_progress_on=[status])
        clear.click(clear_history, outputs=[table, pareto, history], api_name="clear_history")
    return demo


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
           block: bool = True) -> gr.Blocks:
    """Queue requests (one comparison at a time) and serve; ``block=False`` returns once the server is up."""
    demo.queue(default_concurrency_limit=1, max_size=32)
    demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block, show_error=False,
                quiet=not block)
    return demo


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="accel-demo", description="Side-by-side speed and quality demo of accel.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1, this machine only; 0.0.0.0 exposes it)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--share", action="store_true",
                        help="also create a public Gradio share link (off by default; needs internet)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is often fastest on a busy machine)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the app also passes analytics_enabled=False
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own startup probes of localhost
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"accel-demo: --threads must be >= 1, got {args.threads}.")
        import torch

        torch.set_num_threads(args.threads)
    print(f"accel-demo: serving on http://{args.host}:{args.port} (Ctrl+C to stop)")
    launch(build_app(), host=args.host, port=args.port, share=args.share, block=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
