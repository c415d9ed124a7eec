"""One-shot GPU check: the Triton kernels' correctness on CUDA, block-sparse attention against dense
FlashAttention at long sequences, and accel's methods on the shape-true Wan and PixArt workloads in bf16.

    python3 benchmarks/gpu_check.py --out gpu-check            # a CUDA machine: at most 8 minutes on one H200
    python3 benchmarks/gpu_check.py --dry-run --out /tmp/gc    # CPU, Triton's interpreter, tiny sizes

Writes ``gpu_check.json`` and ``gpu_check.md`` (and each method run's ``results.*`` in a subfolder).
It runs from a plain checkout without installing the project (the import names ``accel.kernels``,
``accel.pipelines`` and ``accel.benchmarks`` are mapped to their folders in-process) and installs nothing;
it needs torch, triton, diffusers, transformers, accelerate and psutil. A machine without diffusers can be
handed wheels: download ``diffusers`` and ``importlib_metadata`` (Python 3.12, no dependencies) into an
ignored folder, carry it, and start with ``pip install --no-index --no-deps --target /tmp/site
<folder>/*.whl`` and ``PYTHONPATH=/tmp/site``.

Parts, in order of importance (``--budget-s`` skips what would not finish in time, and says so):
1. **kernels**: ``block_sparse_attention``, its backward (dQ, dK, dV) and ``block_sums`` against the
   references at awkward sizes (sequence tails, head dims 72/80/96, blocks 64/128, rows attending zero or
   one block), fp32/fp16/bf16, under FlashAttention's rule: error <= 2 x torch's own error in the same
   dtype (+1e-5; for gradients also + 2 x the reference's own rounding to the dtype).
2. **attention**: the block-sparse forward (accel's dispatch, Triton on CUDA) against dense SDPA
   (FlashAttention backend where torch has it) at Wan-1.3B's heads (12 x 128), 16K/32K/64K tokens, mask
   densities 0.1/0.2/0.4 chosen by AdaSpa's selection; speedup, ideal 1/density, fraction of ideal.
3. **training**: forward + backward of the trainable sparse operator (Triton forward and backward) against
   SDPA's at 16K/32K tokens, same heads and densities.
4. **methods**: ``accel-bench`` on ``shape:wan-1.3b`` (adaspa, vmoba, delta-dit, quest) and
   ``shape:pixart-xl-512`` (delta-dit, bac, quest) in bf16: speedup against the same run's baseline,
   compute fraction, peak GPU memory. Random weights: quality is not measured.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: The import names pyproject maps to top-level folders (``[tool.setuptools] package-dir``).
PROJECT_PACKAGES = {
    "accel": "accel",
    "accel.kernels": "kernels",
    "accel.pipelines": "pipelines",
    "accel.benchmarks": "benchmarks",
    "accel.demos": "demos",
}


class _ProjectFinder(importlib.abc.MetaPathFinder):
    """Finds the project's packages in the checkout by their installed names, without putting the checkout
    on ``sys.path`` (its ``kernels/`` folder would shadow the ``kernels`` package diffusers probes for)."""

    def find_spec(
        self, fullname: str, path: Any = None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        folder = PROJECT_PACKAGES.get(fullname)
        if folder is None:
            return None
        location = ROOT / folder
        return importlib.util.spec_from_file_location(
            fullname, location / "__init__.py", submodule_search_locations=[str(location)]
        )


def use_checkout_imports() -> None:
    """Import accel from this checkout when it is not installed (a bare GPU machine)."""
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path.pop(0)  # the script's folder: its modules are only meant as accel.benchmarks.*
    if importlib.util.find_spec("accel") is None or importlib.util.find_spec("accel.kernels") is None:
        sys.meta_path.insert(0, _ProjectFinder())


@dataclass(frozen=True)
class KernelCase:
    seq_len: int
    head_dim: int
    block: int
    dtype: str
    batch: int = 1
    heads: int = 2


@dataclass(frozen=True)
class Plan:
    """Sizes of one run: the GPU plan, or the dry run's tiny sizes (same code, CPU interpreter)."""

    kernel_cases: tuple[KernelCase, ...]
    sums_cases: tuple[KernelCase, ...]
    backward_cases: tuple[KernelCase, ...]
    attention_lengths: tuple[int, ...]
    train_lengths: tuple[int, ...]  # forward + backward timing (training through sparse attention)
    attention_heads: int
    attention_head_dim: int
    attention_block: int
    densities: tuple[float, ...]
    attention_repeats: int
    bench_runs: tuple[tuple[str, ...], ...]  # accel-bench arguments, one tuple per run
    device: str
    dtype: str


def _gpu_kernel_cases() -> tuple[KernelCase, ...]:
    awkward = [
        KernelCase(s, d, b, t)
        for s, d, b in (
            (200, 64, 64),
            (200, 72, 64),
            (200, 80, 64),
            (200, 96, 64),
            (200, 128, 64),
            (97, 80, 64),
            (130, 72, 128),
            (257, 64, 128),
        )
        for t in ("fp32", "fp16", "bf16")
    ]
    long = [
        KernelCase(s, d, b, t, batch=2, heads=3)
        for s, d, b in ((1000, 72, 64), (2050, 128, 128), (4099, 80, 128))
        for t in ("fp16", "bf16")
    ]
    return tuple(awkward + long)


GPU_PLAN = Plan(
    kernel_cases=_gpu_kernel_cases(),
    sums_cases=(KernelCase(200, 64, 64, "fp32"), KernelCase(97, 72, 64, "bf16"),
                KernelCase(130, 80, 128, "fp16"), KernelCase(4099, 128, 128, "bf16", batch=2, heads=3)),
    backward_cases=(KernelCase(200, 64, 64, "fp32"), KernelCase(97, 72, 64, "bf16"),
                    KernelCase(130, 80, 128, "fp16"), KernelCase(257, 96, 128, "bf16"),
                    KernelCase(2050, 128, 128, "bf16", batch=2, heads=3),
                    KernelCase(1000, 64, 64, "fp16", batch=2, heads=3)),
    attention_lengths=(16384, 32768, 65536), train_lengths=(16384, 32768), attention_heads=12,
    attention_head_dim=128, attention_block=128,
    densities=(0.1, 0.2, 0.4), attention_repeats=20,
    bench_runs=(
        tuple("--model shape:wan-1.3b:blocks=4 --methods none,adaspa,vmoba,delta-dit,quest "
              "--steps 10 --repeats 3 --warmup 1".split()),
        tuple("--model shape:pixart-xl-512:blocks=8 --methods none,delta-dit,bac,quest "
              "--steps 20 --repeats 3 --warmup 1".split()),
    ),
    device="cuda", dtype="bfloat16",
)
DRY_PLAN = Plan(  # the same parts at sizes the CPU interpreter runs in about a minute
    kernel_cases=(KernelCase(97, 72, 64, "bf16"), KernelCase(130, 80, 128, "fp16")),
    sums_cases=(KernelCase(97, 72, 64, "fp32"),),
    backward_cases=(KernelCase(97, 72, 64, "bf16"),),
    attention_lengths=(256, 384), train_lengths=(256,), attention_heads=1, attention_head_dim=32,
    attention_block=64,
    densities=(0.1, 0.2, 0.4), attention_repeats=1,
    bench_runs=(
        tuple("--model shape:wan-1.3b:blocks=2:latent=16:frames=4 --methods none,adaspa,delta-dit "
              "--steps 3 --repeats 1 --warmup 0".split()),
        tuple("--model shape:pixart-xl-512:blocks=2:latent=8 "
              "--methods none,quest:finetune_iters=1:calib_seeds=1:sensitive_layers=1 "
              "--steps 2 --repeats 1 --warmup 0".split()),
    ),
    device="cpu", dtype="bfloat16",
)


@dataclass
class Report:
    dry_run: bool
    environment: dict[str, Any]
    kernels: list[dict[str, Any]] = field(default_factory=list)
    attention: list[dict[str, Any]] = field(default_factory=list)
    training: list[dict[str, Any]] = field(default_factory=list)
    methods: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    part_seconds: dict[str, float] = field(default_factory=dict)
    elapsed_s: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.errors and all(row["ok"] for row in self.kernels)


def environment(device: str) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "device": device,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    try:
        env["commit"] = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        env["commit"] = None  # a copied tree without .git
    env["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return env


def check_kernels(plan: Plan, device: str) -> list[dict[str, Any]]:
    """Every kernel case: max error, torch's error in the same dtype, and whether the rule holds."""
    import torch
    from accel.kernels.block_sparse_attention import block_sparse_attention, block_sparse_attention_backward
    from accel.kernels.block_sums import block_sums
    from accel.kernels.reference import (
        backward_reference,
        block_sparse_attention_reference,
        block_sums_reference,
        gradients_within_flash_rule,
        masked_attention_grads_same_dtype,
        masked_attention_same_dtype,
        random_block_case,
        within_flash_rule,
    )

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    rows = []
    for case in plan.kernel_cases:
        q, k, v, counts, indices = (
            t.to(device)
            for t in random_block_case(
                case.seq_len, case.head_dim, case.block, batch=case.batch, heads=case.heads
            )
        )
        ref, ref_lse = block_sparse_attention_reference(q, k, v, counts, indices, case.block)
        ql, kl, vl = (t.to(dtypes[case.dtype]) for t in (q, k, v))
        out, lse = block_sparse_attention(ql, kl, vl, counts, indices, case.block)
        same = masked_attention_same_dtype(ql, kl, vl, counts, indices, case.block)
        ok, err, err_torch = within_flash_rule(out, same, ref)
        empty_rows_ok = bool(torch.equal(torch.isinf(lse), torch.isinf(ref_lse)))
        rows.append(
            {
                "kernel": "block_sparse_attention",
                **asdict(case),
                "err": err,
                "err_torch": err_torch,
                "ok": ok and empty_rows_ok,
            }
        )
    for case in plan.backward_cases:
        q, k, v, counts, indices = (
            t.to(device)
            for t in random_block_case(
                case.seq_len, case.head_dim, case.block, batch=case.batch, heads=case.heads
            )
        )
        grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(7)).to(device)
        reference = backward_reference(grad, q, k, v, counts, indices, case.block)
        ql, kl, vl, gl = (t.to(dtypes[case.dtype]) for t in (q, k, v, grad))
        out, lse = block_sparse_attention(ql, kl, vl, counts, indices, case.block)
        grads = block_sparse_attention_backward(gl, ql, kl, vl, out, lse, counts, indices, case.block)
        same = masked_attention_grads_same_dtype(gl, ql, kl, vl, counts, indices, case.block)
        for name, (ok, err, err_torch) in zip(("dq", "dk", "dv"), gradients_within_flash_rule(grads, same,
                                                                                              reference)):
            rows.append({"kernel": f"block_sparse_attention_backward {name}", **asdict(case), "err": err,
                         "err_torch": err_torch, "ok": ok})
    for case in plan.sums_cases:
        gen = torch.Generator().manual_seed(1)
        q, k = (
            torch.randn(case.batch, case.heads, case.seq_len, case.head_dim, generator=gen).to(device)
            for _ in range(2)
        )
        ref, ref_lse = block_sums_reference(q, k, case.block)
        sums, lse = block_sums(q.to(dtypes[case.dtype]), k.to(dtypes[case.dtype]), case.block)
        tol = 1e-4 if case.dtype == "fp32" else 5e-2
        lse_err = float((lse - ref_lse).abs().max())
        sums_err = float(((sums - ref).abs() / (tol * case.block + tol * ref.abs())).max())
        rows.append(
            {
                "kernel": "block_sums",
                **asdict(case),
                "err": lse_err,
                "err_torch": None,
                "ok": lse_err <= tol and sums_err <= 1.0,
            }
        )
    return rows


def _time_ms(fn: Callable[[], Any], repeats: int, device: str) -> float:
    """Median milliseconds of ``fn`` (CUDA events through triton's do_bench on a GPU)."""
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=5, rep=max(25, repeats * 5), return_mode="median"))
    from accel.timing import median_time

    return median_time(fn, repeats, warmup=1)[0] * 1e3


def time_attention(plan: Plan, device: str, deadline: float, skipped: list[str]) -> list[dict[str, Any]]:
    """Dense SDPA vs accel's block-sparse dispatch, per (length, density); the mask is AdaSpa's selection."""
    import torch
    import torch.nn.functional as F
    from accel.attention.backends import sparse_attention
    from accel.benchmarks.attention_bench import cosine, mask_at_density

    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # the interpreter's bf16 dot is emulated
    rows = []
    for seq in plan.attention_lengths:
        if time.monotonic() > deadline:
            skipped.append(f"attention at {seq} tokens and longer: out of time")
            break
        gen = torch.Generator().manual_seed(seq)
        q, k, v = (
            torch.randn(1, plan.attention_heads, seq, plan.attention_head_dim, generator=gen).to(
                device, dtype
            )
            for _ in range(3)
        )

        def dense() -> torch.Tensor:
            if device == "cuda":
                from torch.nn.attention import SDPBackend, sdpa_kernel

                with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
                    return F.scaled_dot_product_attention(q, k, v)
            return F.scaled_dot_product_attention(q, k, v)

        dense_ms = _time_ms(dense, plan.attention_repeats, device)
        reference = dense()
        for density in plan.densities:
            mask = mask_at_density(q, k, density, plan.attention_block)
            backend = "triton" if device == "cuda" else "auto"
            out, used = sparse_attention(q, k, v, mask, backend=backend)
            sparse_ms = _time_ms(
                lambda: sparse_attention(q, k, v, mask, backend=backend), plan.attention_repeats, device
            )
            actual = float(mask.density())
            speedup = dense_ms / sparse_ms
            rows.append(
                {
                    "tokens": seq,
                    "heads": plan.attention_heads,
                    "head_dim": plan.attention_head_dim,
                    "block": plan.attention_block,
                    "density": round(actual, 4),
                    "backend": used,
                    "dense_ms": round(dense_ms, 3),
                    "sparse_ms": round(sparse_ms, 3),
                    "speedup": round(speedup, 3),
                    "ideal": round(1 / actual, 3),
                    "fraction_of_ideal": round(speedup * actual, 3),
                    "cosine_vs_dense": round(cosine(out, reference), 4),
                }
            )
    return rows


def time_training(plan: Plan, device: str, deadline: float, skipped: list[str]) -> list[dict[str, Any]]:
    """Forward + backward of the trainable sparse operator vs dense SDPA's, per (length, density)."""
    import torch
    import torch.nn.functional as F
    from accel.attention.trainable import block_sparse_attention_trainable
    from accel.benchmarks.attention_bench import mask_at_density
    from accel.benchmarks.train_attention_bench import train_step

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []
    for seq in plan.train_lengths:
        if time.monotonic() > deadline:
            skipped.append(f"training at {seq} tokens and longer: out of time")
            break
        gen = torch.Generator().manual_seed(seq)
        shape = (1, plan.attention_heads, seq, plan.attention_head_dim)
        q, k, v = (torch.randn(shape, generator=gen).to(device, dtype).requires_grad_() for _ in range(3))
        grad = torch.randn(shape, generator=gen).to(device, dtype)
        dense_ms = _time_ms(train_step(F.scaled_dot_product_attention, q, k, v, grad), plan.attention_repeats,
                            device)
        for density in plan.densities:
            with torch.no_grad():
                mask = mask_at_density(q, k, density, plan.attention_block)
            sparse = train_step(lambda a, b, c, m=mask: block_sparse_attention_trainable(a, b, c, m),
                                q, k, v, grad)
            sparse_ms = _time_ms(sparse, plan.attention_repeats, device)
            actual = float(mask.density())
            speedup = dense_ms / sparse_ms
            rows.append({"tokens": seq, "heads": plan.attention_heads, "head_dim": plan.attention_head_dim,
                         "block": plan.attention_block, "density": round(actual, 4),
                         "dense_ms": round(dense_ms, 3), "sparse_ms": round(sparse_ms, 3),
                         "speedup": round(speedup, 3), "ideal": round(1 / actual, 3),
                         "fraction_of_ideal": round(speedup * actual, 3)})
    return rows


def run_methods(
    plan: Plan, out: Path, deadline: float, skipped: list[str], errors: list[str]
) -> list[dict[str, Any]]:
    """Each planned ``accel-bench`` run in this process; its records, trimmed to the speed fields."""
    from accel.benchmarks import cli

    rows = []
    for args in plan.bench_runs:
        model = args[args.index("--model") + 1]
        if time.monotonic() > deadline:
            skipped.append(f"{model}: out of time")
            continue
        folder = out / model.split(":")[1]
        code = cli.main([*args, "--device", plan.device, "--dtype", plan.dtype, "--out", str(folder)])
        if code != 0:
            errors.append(f"accel-bench {' '.join(args)} exited {code}")
        results = folder / "results.json"
        if not results.exists():
            continue
        for record in json.loads(results.read_text())["records"]:
            rows.append(
                {
                    "model": model,
                    **{
                        key: record.get(key)
                        for key in (
                            "method",
                            "settings",
                            "steps",
                            "speedup",
                            "speedup_spread",
                            "latency_s",
                            "baseline_latency_s",
                            "compute_fraction",
                            "peak_mem_mb",
                            "params_bytes",
                            "error",
                        )
                    },
                }
            )
    return rows


def markdown(report: Report) -> str:
    env = report.environment
    lines = [
        f"# accel GPU check{' (dry run: CPU, Triton interpreter, tiny sizes)' if report.dry_run else ''}",
        "",
        f"{env.get('gpu') or env['device']}, torch {env['torch']}, triton {env['triton']}, commit "
        f"{env['commit'] or 'unknown'}, {env['date']}; {report.elapsed_s:.0f} s in all ("
        + ", ".join(f"{name} {secs:.0f} s" for name, secs in report.part_seconds.items())
        + ").",
        "",
    ]
    failed = [r for r in report.kernels if not r["ok"]]
    lines += [
        "## Kernels against the fp32 reference",
        "",
        f"{len(report.kernels) - len(failed)} of {len(report.kernels)} cases within FlashAttention's rule "
        "(error <= 2 x torch's error in the same dtype + 1e-5; block sums: LSE and sums within tolerance).",
        "",
    ]
    if failed:
        lines += ["| kernel | S | D | block | dtype | err | torch err |", "|---|---|---|---|---|---|---|"]
        lines += [
            f"| {r['kernel']} | {r['seq_len']} | {r['head_dim']} | {r['block']} | {r['dtype']} | "
            f"{r['err']:.2e} | {_fmt(r['err_torch'], '{:.2e}')} |"
            for r in failed
        ]
        lines.append("")
    lines += [
        "## Block-sparse attention vs dense SDPA",
        "",
        "| tokens | density | backend | dense ms | sparse ms | speedup | ideal | of ideal | cosine |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['tokens']:,} | {r['density']:.3f} | {r['backend']} | {r['dense_ms']:.2f} "
        f"| {r['sparse_ms']:.2f} | {r['speedup']:.2f}x | {r['ideal']:.2f}x | {r['fraction_of_ideal']:.2f} "
        f"| {r['cosine_vs_dense']:.4f} |"
        for r in report.attention
    ]
    lines += [
        "",
        "## Training: forward + backward of the sparse operator vs dense SDPA",
        "",
        "| tokens | density | dense ms | sparse ms | speedup | ideal | of ideal |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['tokens']:,} | {r['density']:.3f} | {r['dense_ms']:.2f} | {r['sparse_ms']:.2f} "
        f"| {r['speedup']:.2f}x | {r['ideal']:.2f}x | {r['fraction_of_ideal']:.2f} |"
        for r in report.training
    ]
    lines += [
        "",
        "## Methods on shape-true workloads (random weights: speed only)",
        "",
        "| model | method | settings | steps | speedup | ± pairs | compute | peak MB | error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.methods:
        cells = [
            r["model"],
            r["method"],
            r["settings"] or "",
            r["steps"],
            _fmt(r["speedup"], "{:.2f}x"),
            _fmt(r["speedup_spread"], "{:.2f}"),
            _fmt(r["compute_fraction"], "{:.3f}"),
            _fmt(r["peak_mem_mb"], "{:.0f}"),
            r["error"] or "",
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    for title, items in (("Skipped", report.skipped), ("Errors", report.errors)):
        if items:
            lines += ["", f"## {title}", "", *(f"- {item}" for item in items)]
    return "\n".join(lines) + "\n"


def _fmt(value: Any, fmt: str) -> str:
    return "" if value is None else fmt.format(value)


PARTS = ("kernels", "attention", "training", "methods")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--out", type=Path, default=Path("gpu-check"), help="folder for gpu_check.json/.md")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU, Triton's interpreter, tiny sizes: the same code paths, for the test suite",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=450.0,
        help="parts that would start after this many seconds are skipped (default 450)",
    )
    p.add_argument("--parts", default=",".join(PARTS), help="comma list of parts to run")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    parts = set(args.parts.split(","))
    unknown = parts - set(PARTS)
    if unknown:
        print(
            f"gpu_check: unknown part(s) {sorted(unknown)}; accepted: {', '.join(PARTS)}",
            file=sys.stderr,
        )
        return 2
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = (
            "1"  # read when the kernels are defined, i.e. before triton is imported
        )
    use_checkout_imports()
    import torch

    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    if plan.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --dry-run for the CPU check", file=sys.stderr)
        return 2
    start = time.monotonic()
    deadline = start + args.budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    report = Report(dry_run=args.dry_run, environment=environment(plan.device))
    steps: list[tuple[str, Callable[[], None]]] = [
        ("kernels", lambda: report.kernels.extend(check_kernels(plan, plan.device))),
        (
            "attention",
            lambda: report.attention.extend(time_attention(plan, plan.device, deadline, report.skipped)),
        ),
        (
            "training",
            lambda: report.training.extend(time_training(plan, plan.device, deadline, report.skipped)),
        ),
        (
            "methods",
            lambda: report.methods.extend(
                run_methods(plan, args.out, deadline, report.skipped, report.errors)
            ),
        ),
    ]
    for name, step in steps:
        if name not in parts:
            continue
        if time.monotonic() > deadline:
            report.skipped.append(f"{name}: out of time")
            continue
        print(f"gpu_check: {name} ...", flush=True)
        began = time.monotonic()
        try:
            step()
        except Exception as exc:  # one broken part must not hide the others' numbers
            report.errors.append(f"{name}: {type(exc).__name__}: {exc}")
        finally:
            report.part_seconds[name] = round(time.monotonic() - began, 1)
            report.elapsed_s = time.monotonic() - start
            _write(args.out, report)
    print(markdown(report))
    print(f"gpu_check: wrote {args.out}/gpu_check.json and gpu_check.md", flush=True)
    return 0 if report.passed else 1


def _write(out: Path, report: Report) -> None:
    (out / "gpu_check.json").write_text(json.dumps({**asdict(report), "passed": report.passed}, indent=1))
    (out / "gpu_check.md").write_text(markdown(report))


if __name__ == "__main__":
    raise SystemExit(main())
