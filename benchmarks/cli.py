"""``accel-bench``: accel methods vs. the baselines users would pick, at matched quality.

    accel-bench --methods all                 # the embedded default, digits-pixart, with its prompts
    accel-bench --model digits-dit --methods none,delta-dit,bac,fbcache,taylorseer --sweep --min-psnr 30
    accelerate launch --multi_gpu --num_processes 2 -m accel.benchmarks --model digits-dit --methods none,bac

Under ``accelerate launch`` the samples are sharded across processes and one report is gathered on
the main process. On a machine without CUDA the processes use gloo on the CPU (accelerate's
``--multi_gpu`` launcher is its torchrun-based one; ``--cpu`` alone starts a single process).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from accel.benchmarks import report
from accel.benchmarks.runner import Record, measure, pair_speedup, score, select_fastest
from accel.benchmarks.spec import (
    DEFAULT,
    NONE,
    BenchMethod,
    available_names,
    check_method_names,
    parse_methods,
)
from accel.benchmarks.workloads import Workload, build_workload
from accel.extras import MissingExtraError, require
from accel.registry import get_method, method_names

DEFAULT_BATCH = {"image": 10, "video": 1, "classifier": 120, "shape": 1}


def _int_list(text: str) -> list[int]:
    try:
        values = []
        for part in text.split(","):
            lo, sep, hi = part.partition("-")
            values.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
        return values
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like '0,1,2' or '0-9', got {text!r}") from None


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _prompt_file(path: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read prompt file {path!r}: {exc}") from None
    prompts = [line.strip() for line in text.splitlines()
               if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise argparse.ArgumentTypeError(f"prompt file {path!r} has no prompts "
                                         "(one per line; '#' starts a comment)")
    return prompts


#: Call keywords the benchmark builds itself, and where the user sets them instead.
_DRIVEN = {
    "prompt": "use --prompts", "class_labels": "use --labels", "generator": "use --seeds",
    "num_inference_steps": "use --steps", "guidance_scale": "use --guidance-scale",
    "negative_prompt": "use --negative-prompt", "height": "use --height", "width": "use --width",
    "num_frames": "use --num-frames", "output_type": "outputs are always tensors",
}


def _call_arg(text: str) -> tuple[str, Any]:
    import json

    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with a keyword name, got {text!r}")
    if key in _DRIVEN:
        raise argparse.ArgumentTypeError(f"{key} is set by accel-bench itself; {_DRIVEN[key]}")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = {"True": True, "False": False, "None": None}.get(value, value)
    return key, parsed


def _device(text: str | None) -> str:
    if text is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu" or (text.startswith("cuda") and torch.cuda.is_available()):
        return text
    cuda = ", cuda, cuda:N" if torch.cuda.is_available() else " (no CUDA device on this machine)"
    raise ValueError(f"--device {text!r} is not available here; accepted: cpu{cuda}.")


DEFAULT_MODEL = "digits-pixart"
SHAPE_NOTE = "speed only: random weights at the published shape, quality not measured"
DEFAULT_STEPS = 50


def model_steps(model_name: str) -> int:
    """An embedded generator's reported step count (digits-pixart 20, the digit DiTs 50), else 50."""
    from accel.pipelines import reported_setting

    return int(reported_setting(model_name, "steps", DEFAULT_STEPS))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="accel-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", action="append", help="embedded name (digits-pixart, digits-dit, digits-video-dit, "
                   "digits-vit), local diffusers folder, hub id, timm name, or a published shape (shape:pixart-xl-512:blocks=4; "
                   "see accel.benchmarks.shapes); repeatable (default: digits-pixart)")
    p.add_argument("--methods", default="all", help="comma list: none, accel methods with settings "
                   "(delta-dit:interval=3), compositions (a+b), baselines (fbcache:threshold=0.1); 'all'")
    p.add_argument("--list-methods", action="store_true", help="print what this install offers and exit")
    p.add_argument("--steps", type=_positive, default=None,
                   help=f"sampler steps (default: an embedded model's own, else {DEFAULT_STEPS})")
    p.add_argument("--seeds", type=_int_list, default=[0])
    p.add_argument("--labels", type=_int_list, default=list(range(10)))
    p.add_argument("--batch", type=_positive, default=None, help="samples per call (default by model kind)")
    p.add_argument("--prompts", type=_prompt_file, default=None, metavar="FILE",
                   help="text pipelines: one prompt per line (default: a small built-in set)")
    p.add_argument("--negative-prompt", default=None, help="text pipelines that take one")
    p.add_argument("--height", type=_positive, default=None,
                   help="output height where the pipeline takes one")
    p.add_argument("--width", type=_positive, default=None, help="output width where the pipeline takes one")
    p.add_argument("--num-frames", type=_positive, default=None, help="video pipelines: frames per sample")
    p.add_argument("--call-arg", type=_call_arg, action="append", default=[], metavar="KEY=VALUE",
                   help="another keyword of the pipeline's call, repeatable; VALUE is read as JSON when it "
                   "parses (true, 16, 0.5), else as text: e.g. --call-arg max_sequence_length=120")
    p.add_argument("--guidance-scale", type=float, default=None, help="default: the pipeline's own")
    p.add_argument("--lpips-weights", default=None, metavar="FILE",
                   help="torchvision AlexNet checkpoint for LPIPS "
                   "(default: torch's hub cache; skipped without)")
    p.add_argument("--clip", default=None, metavar="FOLDER",
                   help="local CLIP model folder for the CLIP score of prompt pipelines "
                   "(default: the hub cache)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                   help="model dtype for the baseline and every method")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when present)")
    p.add_argument("--repeats", type=_positive, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default="bench-out", help="folder for results.json/.md, pareto.png, grids")
    p.add_argument("--sweep", action="store_true", help="search each method's settings grid")
    p.add_argument("--min-psnr", type=float, default=None, help="quality floor for --sweep (dB vs none)")
    return p


def _fits_blocks(point: dict[str, Any], num_blocks: int | None) -> bool:
    """A grid point that caches more blocks than the model has cannot apply (small or pruned models)."""
    return num_blocks is None or int(point.get("cached_blocks", 0)) <= num_blocks


def expand_sweep(methods: list[BenchMethod], steps: int, num_blocks: int | None = None) -> list[BenchMethod]:
    """Each method that was not given explicit settings becomes one entry per grid point (points that do
    not fit a model of ``num_blocks`` blocks are left out)."""
    from accel.benchmarks.spec import parse_item

    out: list[BenchMethod] = []
    for method in methods:
        composed = method.kind == "accel" and len(method.configs) > 1
        if method.swept or method.kind in (NONE, DEFAULT) or composed:
            out.append(method)
        elif method.kind == "baseline":
            from accel.benchmarks.baselines import BASELINES

            grid = BASELINES[method.baseline].grid
            out.extend(parse_item(_item(method.baseline, point)) for point in grid)
        else:
            config_cls = type(method.configs[0])
            grid = config_cls.sweep_grid(steps) if hasattr(config_cls, "sweep_grid") else [{}]
            fitting = [point for point in grid if _fits_blocks(point, num_blocks)]
            out.extend(parse_item(_item(method.family, point)) for point in fitting)
    return out


def _item(name: str, settings: dict[str, Any]) -> str:
    return ":".join([name, *(f"{k}={v}" for k, v in settings.items())])


def applicable_methods(workload: Workload) -> list[str]:
    """Names ``all`` expands to for this workload: accel methods that fit it, then available baselines."""
    names = [n for n in method_names() if workload.is_denoiser or not get_method(n).needs_denoiser]
    names = [n for n in names if _fits(n, workload)]
    accel_names = set(method_names())
    baselines = [n for n, status in available_names().items()
                 if status.startswith("available") and n not in accel_names and n != "none"]
    if not workload.is_denoiser:
        baselines = [n for n in baselines if n.startswith("torchao")]
    # accel.patch(pipe) with no method named: what a user who reads no further gets
    default = [DEFAULT] if workload.is_denoiser and workload.kind != "shape" else []
    return default + names + [n for n in baselines if _fits(n, workload)]


def _block_count(workload: Workload) -> int | None:
    if not workload.is_denoiser:
        return None
    from accel.registry import find_adapter

    return len(find_adapter(workload.model).blocks())


def _fits(name: str, workload: Workload) -> bool:
    # sparse attention only pays off on long sequences; the image DiT has tens of tokens
    if name in ("adaspa", "vmoba", "flex-window") and workload.kind == "image":
        return False
    if name == "delta-dit" and workload.is_denoiser:  # a Δ over a block range needs one residual chain
        from accel.registry import find_adapter

        return getattr(find_adapter(workload.model), "sequential_blocks", True)
    return True


def run(args: argparse.Namespace, argv: list[str]) -> int:
    require("accelerate", "bench", "accel-bench's process state (it shards samples under accelerate launch)")
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState(cpu=not torch.cuda.is_available())
    out = Path(args.out)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    env = report.environment(argv)
    env["processes"] = state.num_processes
    device = _device(args.device)
    dtype = DTYPES[args.dtype]
    sizes = {"negative_prompt": args.negative_prompt, "height": args.height, "width": args.width,
             "num_frames": args.num_frames, **dict(args.call_arg)}
    env.update(device=device, dtype=args.dtype, **{k: v for k, v in sizes.items() if v is not None})
    if args.prompts:
        env["prompts"] = args.prompts
    check_method_names(args.methods)  # a typo fails before any model loads
    records: list[Record] = []
    interrupted = False
    try:
        for model_name in args.model or [DEFAULT_MODEL]:
            steps = args.steps or model_steps(model_name)
            workload = build_workload(model_name, steps, args.labels, args.seeds, 1, args.guidance_scale,
                                      prompts=args.prompts, sizes=sizes, dtype=dtype, device=device)
            workload.batch = args.batch or DEFAULT_BATCH[workload.kind]
            workload.lpips_weights, workload.clip_model = args.lpips_weights, args.clip
            methods = parse_methods(args.methods, applicable_methods(workload))
            if args.sweep:
                methods = expand_sweep(methods, steps, _block_count(workload))
            records.extend(_run_model(workload, methods, args, state, gather_object, out, env, records))
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: keeping the finished records", file=sys.stderr)
    if state.is_main_process:
        if args.sweep:  # without a sweep every measured point is a reported point
            select_fastest(records, args.min_psnr)
        _write(out, env, records)
        print(report.table(records, selected_only=args.sweep))
        print(f"\nwrote {out}/results.json, results.md, pareto.png")
    return 130 if interrupted else (1 if records and all(r.error for r in records) else 0)


def _run_model(workload, methods, args, state, gather_object, out, env, done) -> list[Record]:
    batches = list(range(len(workload.batches())))
    mine = batches[state.process_index :: state.num_processes]
    shard = lambda items: [items[i] for i in mine]  # noqa: E731
    records: list[Record] = []
    reference: torch.Tensor | None = None
    rows: dict[str, torch.Tensor] = {}
    bar = tqdm(methods, desc=workload.name, disable=not state.is_main_process)
    for method in bar:
        bar.set_postfix_str(method.label[:40])
        record, outputs = measure(workload, method, args.warmup, args.repeats, shard)
        gathered = gather_object([(mine, outputs, record.pairs)])
        outputs = _reassemble(gathered, len(batches))
        pairs = [pair for _, _, mine_pairs in gathered for pair in mine_pairs]
        if pairs:  # every process's pairs: the ratios are per pair, so processes need not agree in speed
            record.pairs = pairs
            record.latency_s = statistics.median(t for _, t in pairs)
            record.baseline_latency_s = statistics.median(b for b, _ in pairs)
            record.speedup, record.speedup_spread = pair_speedup(pairs)
        if method.kind == "none":
            reference = outputs
        for reason in score(record, workload, outputs, reference):
            skipped = env.setdefault("skipped_metrics", [])
            if reason not in skipped:
                skipped.append(reason)
                if state.is_main_process:
                    print(f"accel-bench: {reason}", file=sys.stderr)
        if workload.kind == "shape":
            record.notes.append(SHAPE_NOTE)
        records.append(record)
        if outputs is not None and (method.kind == "none" or not args.sweep):
            rows[method.label] = outputs
        if state.is_main_process:
            _write(out, env, done + records)
    if state.is_main_process and rows and workload.kind in ("image", "video"):
        report.write_grid(out / f"grid-{Path(workload.name).name}.png", rows)
    return records


def _reassemble(gathered: list[tuple[list[int], list[torch.Tensor] | None, Any]], count: int) -> torch.Tensor | None:
    """Put every process's batch outputs back in sample order."""
    pieces: dict[int, torch.Tensor] = {}
    for indices, outputs, _timings in gathered:
        if outputs is None:
            return None
        pieces.update(zip(indices, outputs))
    return torch.cat([pieces[i] for i in range(count)]) if len(pieces) == count else None


def _write(out: Path, env: dict[str, Any], records: list[Record]) -> None:
    report.write_json(out / "results.json", env, records)
    report.write_markdown(out / "results.md", env, records)
    report.write_pareto(out / "pareto.png", records)


#: Loggers whose messages a benchmark user cannot act on: torch's pytree deprecation notes that torchao's
#: import triggers, diffusers' note about torchao-serialised checkpoints (none are loaded here) and
#: FasterCache's experimental banner (it runs here as a baseline, on purpose).
_NOISE_LOGGERS = ("torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer",
                  "diffusers.hooks.faster_cache")


def quiet_known_noise() -> None:
    import logging

    from diffusers.utils import logging as diffusers_logging

    for name in _NOISE_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    diffusers_logging.disable_progress_bar()  # "Loading pipeline components" bars; the run has its own
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # text encoders' "Loading weights" bars
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_known_noise()
    args = build_parser().parse_args(argv)
    if args.list_methods:
        for name, status in available_names().items():
            print(f"{name:22s} {status}")
        return 0
    if args.min_psnr is not None and not args.sweep:
        print("note: --min-psnr only selects points under --sweep", file=sys.stderr)
    try:
        return run(args, argv)
    except (ValueError, FileNotFoundError, OSError, MissingExtraError) as exc:
        print(f"accel-bench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
