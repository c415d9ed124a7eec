"""QuEST benchmark: W8A8 / W4A8 / W4A4 on digits-dit (and digits-vit), QuEST against naive PTQ
(one-step and all-step calibration, same quantizers, no finetuning) and the int8 baselines users
would pick (torch.ao dynamic quantization, torchao int8 dynamic, optimum-quanto when installed).

    python -m accel.benchmarks.quest_bench --quick          # smoke run: 10 steps, few samples
    python -m accel.benchmarks.quest_bench --threads 2      # the full table (run on a quiet machine)

Quality is against the fp32 output of the same seeds (PSNR/SSIM) plus the task metric (judge
accuracy of generated digits; top-1 for the ViT). Speed is a ratio to fp32 and bf16 measured in the
same run: warm-up, then the median of ``--repeats`` (spread reported), for the whole denoiser forward
and for its linear layers alone (the part quantization accelerates).
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import accel
from accel.extras import require
from accel.methods import quest
from accel.modules import output_tensor
from accel.quant.finetune import relative_error, swapped, teacher_outputs
from accel.timing import median_time

BITS = ("w8a8", "w4a8", "w4a4", "w4a16")


def _time(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> tuple[float, float]:
    with torch.no_grad():
        median, spread, _ = median_time(fn, repeats, warmup)
    return median, spread


def _linear_time(layers: dict[str, Any], rows: dict[str, int], repeats: int) -> dict[str, float]:
    """Summed time of every quantized layer at its own shape: chosen kernel, fp32 and bf16 F.linear."""
    cache: dict[tuple, tuple[float, float, float]] = {}
    total = {"quant": 0.0, "fp32": 0.0, "bf16": 0.0}
    for name, layer in layers.items():
        m = max(rows.get(name, 256), 1)
        key = (layer.spec, m, layer.kernel)
        if key not in cache:
            x = torch.randn(m, layer.spec.in_features)
            if layer.a_scale is not None:
                x = x * float(layer.a_scale) * 40
            w, b = layer.weight.detach(), layer.bias
            xb, wb = x.bfloat16(), w.bfloat16()
            bb = None if b is None else b.bfloat16()
            cache[key] = (
                _time(lambda layer=layer, x=x: layer(x), repeats)[0],
                _time(lambda x=x, w=w, b=b: F.linear(x, w, b), repeats)[0],
                _time(lambda xb=xb, wb=wb, bb=bb: F.linear(xb, wb, bb), repeats)[0],
            )
        q, f, h = cache[key]
        total["quant"] += q
        total["fp32"] += f
        total["bf16"] += h
    return total


def _step_error(model: torch.nn.Module, qm: Any, bench: _Dit) -> float:
    """Mean relative output error per denoiser call on the held-out trajectory (teacher forcing)."""
    with swapped(model, qm.layers), torch.no_grad():
        errors = [
            relative_error(output_tensor(model(*a, **k)), t)
            for (a, k), t in zip(bench.val, bench.val_targets)
        ]
    return float(torch.stack(errors).mean())


def _bytes(module: torch.nn.Module) -> int:
    """Serialized ``state_dict`` size: counts packed int8 params (torch.ao) and tensor subclasses
    (torchao, quanto) at their real storage, which ``numel * element_size`` would not."""
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.getbuffer().nbytes


class _Dit:
    """digits-dit with its fixed benchmark samples, fp32/bf16 references and a timing input."""

    def __init__(self, args: argparse.Namespace) -> None:
        from accel.pipelines import generate, load

        self.args = args
        self.pipe = load("digits-dit")
        self.labels = [label for label in range(10) for _ in range(args.per_label)]
        self.seeds = [10_000 + i for i in range(len(self.labels))]
        self.generate = lambda: generate(
            self.pipe, self.labels, self.seeds, steps=args.steps, guidance_scale=4.0
        )
        self.base = self.generate()
        # Held-out trajectory (a seed no calibration uses): per-step output error of a quantized model
        # under teacher forcing, a quality signal that needs no judge.
        held_out = [
            {
                "class_labels": list(range(10)),
                "generator": torch.Generator().manual_seed(777),
                "output_type": "np",
                "num_inference_steps": args.steps,
            }
        ]
        config = quest.QuESTConfig(max_inputs=24)
        self.val = quest.calibrate(self.pipe, config, calls=held_out, progress=False).inputs
        self.val_targets = teacher_outputs(self.pipe.transformer, self.val)
        self.judge_note = None
        model = self.pipe.transformer
        batch = 20  # 10 labels with classifier-free guidance, as one pipeline step sees them
        gen = torch.Generator().manual_seed(0)
        self.inputs = (
            torch.randn(batch, 1, 16, 16, generator=gen),
            torch.full((batch,), 500),
            torch.arange(batch) % 11,
        )
        self.fp32_bytes = _bytes(model)
        self.fp32 = self.latency(model)
        bf16 = copy.deepcopy(model).to(torch.bfloat16)
        x, t, y = self.inputs
        self.bf16 = _time(lambda: bf16(x.bfloat16(), timestep=t, class_labels=y), args.repeats)

    def latency(self, model: torch.nn.Module) -> tuple[float, float]:
        x, t, y = self.inputs
        return _time(lambda: model(x, timestep=t, class_labels=y), self.args.repeats)

    def quality(self, images: torch.Tensor) -> dict[str, Any]:
        from accel.pipelines import judges

        from accel import metrics

        out = {
            "psnr": round(metrics.psnr(self.base, images), 2),
            "ssim": round(metrics.ssim(self.base, images), 4),
        }
        try:
            out["judge_acc"] = round(judges.judge_accuracy(images, self.labels), 4)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:  # the judge is trained by another job
            out["judge_acc"] = f"n/a ({type(exc).__name__})"
        return out


def _row(
    name: str,
    bits: str,
    method: str,
    bench: _Dit,
    images: torch.Tensor,
    latency: tuple[float, float],
    model_bytes: int,
    extra: dict[str, Any],
) -> dict[str, Any]:
    return {
        "model": name,
        "bits": bits,
        "method": method,
        **bench.quality(images),
        "bytes": model_bytes,
        "bytes_ratio": round(model_bytes / bench.fp32_bytes, 3),
        "speed_vs_fp32": round(bench.fp32[0] / latency[0], 2),
        "speed_vs_bf16": round(bench.bf16[0] / latency[0], 2),
        "latency_ms": round(latency[0] * 1e3, 2),
        "spread_ms": round(latency[1] * 1e3, 2),
        **extra,
    }


def dit_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    bench = _Dit(args)
    pipe, model = bench.pipe, bench.pipe.transformer
    rows = [
        _row("digits-dit", "fp32", "fp32", bench, bench.base, bench.fp32, bench.fp32_bytes, {}),
        {
            **_row("digits-dit", "bf16", "bf16", bench, bench.base, bench.bf16, bench.fp32_bytes // 2, {}),
            "psnr": "n/a",
            "ssim": "n/a",
            "judge_acc": "n/a",
        },
    ]
    for bits in args.bits:
        config = quest.QuESTConfig(
            bits=bits, finetune_iters=args.iters, calib_seeds=args.calib_seeds, calib_steps=args.steps,
            act_range=args.act_range, first_last_8bit=not args.all_layers_low_bit,
            keep_float_when_faster=False,  # every layer quantized: this compares the quantizers
        )
        calibs = {
            "all-step": quest.calibrate(pipe, config),
            "one-step": quest.calibrate(pipe, config, steps=[0]),
        }
        variants = [
            ("ptq one-step", "one-step", 0),
            ("ptq all-step", "all-step", 0),
            ("quest", "all-step", args.iters),
        ]
        for method, calib_name, iters in variants:
            start = time.perf_counter()
            qm = quest.finetune(pipe, calibs[calib_name], config, iters=iters)
            seconds = time.perf_counter() - start
            with tempfile.TemporaryDirectory() as folder:
                qm.save(folder)
                with accel.patch(pipe, config.replace(artifact=folder)) as patch:
                    images = bench.generate()
                    latency = bench.latency(model)
                    facts = patch.report().methods["quest"]
                    model_bytes = _bytes(model)
            linear = _linear_time(qm.layers, qm.meta.get("rows", {}), args.repeats)
            extra = {
                "step_err": round(_step_error(model, qm, bench), 5),
                "linear_vs_fp32": round(linear["fp32"] / linear["quant"], 2),
                "linear_vs_bf16": round(linear["bf16"] / linear["quant"], 2),
                "kernels": facts["kernels"],
                "quantize_s": round(seconds, 1),
                "finetuned": len(qm.meta.get("finetuned", [])),
            }
            rows.append(
                _row(
                    "digits-dit",
                    bits,
                    method,
                    bench,
                    images,
                    latency,
                    model_bytes,
                    extra,
                )
            )
    rows += _baselines(bench, args)
    return rows


def _swap_run(bench: _Dit, quantized: torch.nn.Module) -> tuple[torch.Tensor, tuple[float, float]]:
    original = bench.pipe.transformer
    bench.pipe.transformer = quantized
    try:
        return bench.generate(), bench.latency(quantized)
    finally:
        bench.pipe.transformer = original


def _quanto_weight_only(bench: _Dit) -> dict[str, Any]:
    """optimum-quanto's qint4 weight-only quantization: the peer of ``w4a16``."""
    try:
        from optimum.quanto import freeze, qint4, quantize
    except ImportError as exc:
        return {"model": "digits-dit", "bits": "w4a16", "method": "optimum-quanto",
                "note": f"not installed ({exc})"}
    qto = copy.deepcopy(bench.pipe.transformer)
    quantize(qto, weights=qint4)
    freeze(qto)
    images, latency = _swap_run(bench, qto)
    return _row("digits-dit", "w4a16", "optimum-quanto qint4 weights", bench, images, latency, _bytes(qto),
                {})


def _baselines(bench: _Dit, args: argparse.Namespace) -> list[dict[str, Any]]:
    """int8 baselines at W8A8: torch.ao dynamic (fbgemm), torchao int8 dynamic, optimum-quanto; and
    optimum-quanto's qint4 weights beside ``w4a16``."""
    rows = [_quanto_weight_only(bench)] if "w4a16" in args.bits else []
    if "w8a8" not in args.bits:
        return rows
    model = bench.pipe.transformer
    dyn = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
    images, latency = _swap_run(bench, dyn)
    rows.append(_row("digits-dit", "w8a8", "torch.ao dynamic int8", bench, images, latency, _bytes(dyn), {}))
    try:
        torchao = require("torchao.quantization", "bench", "quest_bench's torchao row")
        tao = copy.deepcopy(model)
        torchao.quantize_(tao, torchao.Int8DynamicActivationInt8WeightConfig())
        images, latency = _swap_run(bench, tao)
        rows.append(
            _row(
                "digits-dit", "w8a8", "torchao int8 dynamic (eager)", bench, images, latency, _bytes(tao), {}
            )
        )
    except ImportError as exc:
        rows.append(
            {"model": "digits-dit", "bits": "w8a8", "method": "torchao", "note": str(exc)}
        )
    try:
        from optimum.quanto import Calibration, freeze, qint8, quantize

        qto = copy.deepcopy(model)
        quantize(qto, weights=qint8, activations=qint8)
        original = bench.pipe.transformer
        bench.pipe.transformer = qto
        try:
            with Calibration():
                bench.generate()
        finally:
            bench.pipe.transformer = original
        freeze(qto)
        images, latency = _swap_run(bench, qto)
        rows.append(
            _row("digits-dit", "w8a8", "optimum-quanto w8a8", bench, images, latency, _bytes(qto), {})
        )
    except ImportError as exc:
        rows.append(
            {
                "model": "digits-dit",
                "bits": "w8a8",
                "method": "optimum-quanto",
                "note": f"not installed ({exc})",
            }
        )
    return rows


def vit_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    from accel.pipelines import load
    from accel.pipelines.data import load_digit_images

    from accel import metrics

    try:
        model = load("digits-vit")
    except (OSError, ValueError, RuntimeError, KeyError) as exc:  # trained by another job
        return [{"model": "digits-vit", "note": f"not available ({type(exc).__name__}: {exc})"}]
    test, labels = load_digit_images(16, "test")
    train, _ = load_digit_images(16, "train")
    calib_images = train[: 64 if args.quick else 256]
    batch = test[:256]
    fp32 = _time(lambda: model(batch), args.repeats)
    bf16_model = copy.deepcopy(model).to(torch.bfloat16)
    bf16 = _time(lambda: bf16_model(batch.bfloat16()), args.repeats)
    rows = [
        {
            "model": "digits-vit",
            "bits": "fp32",
            "method": "fp32",
            "top1": round(metrics.top1(model, test, labels), 4),
            "latency_ms": round(fp32[0] * 1e3, 2),
            "speed_vs_bf16": round(bf16[0] / fp32[0], 2),
        }
    ]
    for bits in args.bits:
        # Every layer quantized: this benchmark compares the quantizers, not the speed-first default.
        config = quest.QuESTConfig(bits=bits, finetune_iters=args.iters, max_inputs=16,
                                   keep_float_when_faster=False)
        calib = quest.calibrate(model, config, images=calib_images, batch_size=16)
        for method, iters in (("ptq", 0), ("quest", args.iters)):
            qm = quest.finetune(model, calib, config, iters=iters)
            with tempfile.TemporaryDirectory() as folder:
                qm.save(folder)
                with accel.patch(model, config.replace(artifact=folder)):
                    top1 = metrics.top1(model, test, labels)
                    latency = _time(lambda: model(batch), args.repeats)
            rows.append(
                {
                    "model": "digits-vit",
                    "bits": bits,
                    "method": method,
                    "top1": round(top1, 4),
                    "latency_ms": round(latency[0] * 1e3, 2),
                    "speed_vs_fp32": round(fp32[0] / latency[0], 2),
                    "speed_vs_bf16": round(bf16[0] / latency[0], 2),
                }
            )
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(row.get(k, "")) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m accel.benchmarks.quest_bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--bits", default=",".join(BITS), help=f"comma-separated: {','.join(BITS)}")
    parser.add_argument("--steps", type=int, default=50, help="sampler steps (generation and calibration)")
    parser.add_argument("--per-label", type=int, default=10, help="generated samples per digit")
    parser.add_argument("--iters", type=int, default=300, help="QuEST finetuning iterations")
    parser.add_argument("--calib-seeds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--act-range", default="mse", choices=("minmax", "percentile", "mse"),
                        help="static activation ranges for every digits-dit variant (PTQ and QuEST alike)")
    parser.add_argument("--all-layers-low-bit", action="store_true",
                        help="quantize the first and last layers' activations at the low bit width too")
    parser.add_argument("--skip-vit", action="store_true")
    parser.add_argument("--skip-dit", action="store_true")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 10 steps, 1 sample per digit, 20 iters"
    )
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    args.bits = [b.strip() for b in args.bits.split(",") if b.strip()]
    for bits in args.bits:
        quest.QuESTConfig(bits=bits)  # clear error for a bad value before any work
    if args.quick:
        args.steps, args.per_label, args.iters, args.repeats, args.calib_seeds = 10, 1, 20, 3, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    header = (
        f"threads={torch.get_num_threads()} load_avg_1min={load:.1f} cpus={os.cpu_count()} "
        f"torch={torch.__version__} cpu={torch.backends.cpu.get_cpu_capability()}"
        + ("  [LOADED MACHINE: timings unreliable]" if load > (os.cpu_count() or 1) * 0.75 else "")
    )
    print(header)
    rows = [] if args.skip_dit else dit_rows(args)
    if not args.skip_vit:
        rows += vit_rows(args)
    print(_table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "command": "python -m accel.benchmarks.quest_bench " + " ".join(argv or []),
                    "machine": header,
                    "rows": rows,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
