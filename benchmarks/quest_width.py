"""QuEST at published widths: whole-denoiser latency of fp32, bf16 and the quantized variants on a shape-true
workload (random weights), each against the fp32 model in the same run, with cosine similarity to the fp32
output (quality on random weights means nothing; the cosine only shows the quantized model computes the same
function) and parameter bytes.

    python -m accel.benchmarks.quest_width --model shape:pixart-xl-512:blocks=4 --out bench-out/quest-width
    python -m accel.benchmarks.quest_width --model shape:wan-1.3b:blocks=2:frames=2 --variants fp32,w8a8

Variants: ``fp32``, ``bf16``; ``w8a8``, ``w4a8`` (static per-tensor activations calibrated on three timesteps'
inputs, the default kernels chosen by measured speed, no finetuning), ``w4a16`` (4-bit weights only); a
``-bf16`` suffix runs the variant on the bf16 model; ``prune30+w8a8`` removes 30% of the blocks by position
(HierarchicalPrune without distillation) under dynamic per-token W8A8; ``torchao-int8`` is torchao's int8
dynamic-activation int8-weight quantization, compiled; ``w8a8-compiled`` is W8A8 with every layer on the fused
kernel under ``torch.compile``. One call is one denoiser forward at the middle timestep
with the family's CFG batch; times are medians of ``--repeats`` calls after a warm-up, each variant paired
with an fp32 timing taken just before it.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accel.benchmarks.shapes import ShapePipeline, parse_shape

from accel.prune.structure import parameter_bytes

VARIANTS = (
    "fp32", "bf16", "w8a8", "w8a8-bf16", "w4a8", "w4a16", "w4a16-bf16", "prune30+w8a8", "torchao-int8",
    "w8a8-compiled",
)


def call_inputs(pipe: ShapePipeline, timestep: float) -> tuple[tuple, dict[str, Any]]:
    """One denoiser call's ``(args, kwargs)`` as the fixed-schedule loop makes it (CFG batch included)."""
    shape = pipe.spec.shape
    x = pipe._latents([0])
    batch = torch.cat([x, x]) if shape.cfg == "batched" else x
    kwargs = shape.inputs(shape, pipe.transformer, batch, torch.Generator().manual_seed(7))
    t = timestep / 1000 if shape.model_class == "FluxTransformer2DModel" else timestep
    kwargs = {**kwargs, "timestep": torch.full((batch.shape[0],), t), "return_dict": False}
    return (batch,), kwargs


def _cast(inputs: tuple[tuple, dict[str, Any]], dtype: torch.dtype) -> tuple[tuple, dict[str, Any]]:
    def one(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.to(dtype)
        return {k: one(w) for k, w in v.items()} if isinstance(v, dict) else v

    args, kwargs = inputs
    return tuple(one(a) for a in args), {k: one(v) for k, v in kwargs.items()}


def median_call_s(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up (and compilation, for compiled variants)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30))


def _quantized(model: torch.nn.Module, bits: str, calib: list[tuple[tuple, dict]], folder: Path,
               kernel: str = "auto") -> Any:
    """``accel.patch`` of ``model`` with a QuEST artifact made here (static activation ranges from
    ``calib``)."""
    import accel
    from accel.methods import quest

    config = quest.QuESTConfig(bits=bits, finetune_iters=0, kernel=kernel)
    if config.needs_calibration:
        qmodel = quest.quantize(model, config, inputs=calib, progress=False)
    else:
        qmodel = quest.finetune(model, None, config, progress=False)
    path = qmodel.save(folder / f"{bits}-{next(model.parameters()).dtype}")
    return accel.patch(model, config.replace(artifact=str(path)))


def _pruned_w8a8(model: torch.nn.Module) -> Any:
    import accel
    from accel.methods import hierarchical_prune as hp
    from accel.methods import quest

    return accel.patch(model, hp.HierarchicalPruneConfig(ratio=0.3),
                       quest.QuESTConfig(act_granularity="per_token", finetune_iters=0))


def _torchao(model: torch.nn.Module) -> torch.nn.Module:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    quantized = copy.deepcopy(model)
    quantize_(quantized, Int8DynamicActivationInt8WeightConfig())
    quantized.compile()
    return quantized


def _patch_bytes(patch: Any, model: torch.nn.Module) -> int:
    handle = patch.handle("quest") if patch is not None else None
    return int(getattr(handle, "quant_bytes", parameter_bytes(model)))


def run(model_name: str, variants: list[str], repeats: int, timestep: float) -> dict[str, Any]:
    spec = parse_shape(model_name)
    pipe = ShapePipeline(spec)
    fp32 = pipe.transformer  # the baseline, never patched
    working = copy.deepcopy(fp32)  # what the variants patch (and unpatch)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    inputs = call_inputs(pipe, timestep)
    calib = [call_inputs(pipe, t) for t in (900.0, 500.0, 100.0)]
    models = {torch.float32: working, torch.bfloat16: bf16}

    def forward(model: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
        with torch.no_grad():
            return model(*_cast(inputs, dtype)[0], **_cast(inputs, dtype)[1])[0]

    reference = forward(fp32, torch.float32).float()
    fp32_bytes = parameter_bytes(fp32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in variants:
            name, _, suffix = variant.partition("-")
            dtype = torch.bfloat16 if suffix == "bf16" or variant == "bf16" else torch.float32
            model, patch, started = models[dtype], None, time.perf_counter()
            if name.startswith(("w8", "w4")):
                # Compiled: every layer on the fused custom op, which stays inside inductor's graph
                kernel = "fused" if suffix == "compiled" else "auto"
                patch = _quantized(model, name, [_cast(c, dtype) for c in calib], Path(tmp), kernel)
                if suffix == "compiled":
                    model = torch.compile(model)
            elif variant == "prune30+w8a8":
                patch = _pruned_w8a8(model)
            elif variant == "torchao-int8":
                model = _torchao(model)
            prepare_s = time.perf_counter() - started
            try:
                base_s = median_call_s(lambda: forward(fp32, torch.float32), repeats)
                latency_s = median_call_s(lambda m=model, d=dtype: forward(m, d), repeats)
                out = forward(model, dtype).float()
                report = patch.report().methods.get("quest", {}) if patch is not None else {}
                # torchao's quantized tensors report their float size: its bytes are not measured here
                nbytes = None if variant == "torchao-int8" else _patch_bytes(patch, model)
                rows.append({
                    "variant": variant, "latency_s": round(latency_s, 4), "fp32_s": round(base_s, 4),
                    "speedup_vs_fp32": round(base_s / latency_s, 3),
                    "cosine_vs_fp32": round(cosine(out, reference), 5),
                    "params_mb": None if nbytes is None else round(nbytes / 2**20, 1),
                    "bytes_vs_fp32": None if nbytes is None else round(nbytes / fp32_bytes, 3),
                    "prepare_s": round(prepare_s, 1), "kernels": report.get("kernels"),
                    "kept_float": report.get("kept_float"),
                })
            finally:
                if patch is not None:
                    patch.remove()
            print(json.dumps(rows[-1]), flush=True)
    by_name = {r["variant"]: r for r in rows}
    if "bf16" in by_name:  # every row against bf16 too: the ratio of the two fp32-paired speedups
        for r in rows:
            r["speedup_vs_bf16"] = round(r["speedup_vs_fp32"] / by_name["bf16"]["speedup_vs_fp32"], 3)
    return {"model": spec.describe(), "timestep": timestep, "repeats": repeats,
            "threads": torch.get_num_threads(),
            "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    cols = ("variant", "latency_s", "fp32_s", "speedup_vs_fp32", "speedup_vs_bf16", "cosine_vs_fp32",
            "params_mb", "bytes_vs_fp32", "kernels")
    title = f"{result['model']}; one denoiser call at t={result['timestep']:g}, median of {result['repeats']}"
    lines = [title, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in result["rows"]:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shape:pixart-xl-512:blocks=4")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated from {', '.join(VARIANTS)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timestep", type=float, default=500.0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="folder for quest_width.json and .md")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; accepted: {', '.join(VARIANTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.model, variants, args.repeats, args.timestep)
    text = markdown(result)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "quest_width.json").write_text(json.dumps(result, indent=1))
        (out / "quest_width.md").write_text(text)


if __name__ == "__main__":
    main()
