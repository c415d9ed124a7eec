"""HierarchicalPrune benchmark: digits-dit, digits-pixart and digits-vit with 20/30/40% of blocks removed.

    python -m accel.benchmarks.prune_bench                 # full run (the lead runs timing on a quiet machine)
    python -m accel.benchmarks.prune_bench --quick         # smoke run: 30% only, few images, short distillation
    python -m accel.benchmarks.prune_bench --no-timing     # quality only (safe on a loaded machine)

Variants at each ratio (same block count k):
- ``hierarchical``: blocks chosen by position + measured sensitivity, then Sensitivity-Guided Distillation
  with Positional Weight Preservation (the method);
- ``hierarchical-nodistil``: the same blocks, no recovery (isolates selection from distillation);
- ``naive-last``: the last k removable blocks, no distillation (the baseline users would try first);
- ``random+distil``: k random removable blocks with the same distillation budget;
- ``hierarchical+int4`` (30% only, when QuEST is installed): the distilled model with 4-bit weights.

Reports latency ratio (median of repeats after a warm-up, spread given), parameter bytes, judge accuracy /
top-1, PSNR / SSIM (DiT) or prediction agreement (ViT) vs the unpruned model of the same seeds. Writes
``<out>/prune_results.json`` and ``.md``, sensitivity tables + plots, and the 30% pruned models (diffusers /
timm folders) with their artifacts.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from dataclasses import dataclass
from typing import Any

import torch

from accel import metrics
from accel.pipelines import judges
from accel.methods import hierarchical_prune as hp
from accel.prune.sensitivity import analyze_blocks
from accel.prune.structure import parameter_bytes, pinned_blocks, prunable_blocks
from accel.registry import find_adapter
from accel.timing import median_time

TARGET = "-30% blocks: latency <= 0.72x and judge-accuracy drop <= 3 points; with int4 weights memory <= 0.25x"


def timed(fn: Any, repeats: int) -> dict[str, float]:
    median, _, times = median_time(fn, repeats)
    return {"median_s": median, "min_s": min(times), "max_s": max(times), "repeats": repeats}


def random_blocks(model: torch.nn.Module, k: int, seed: int) -> list[int]:
    blocks = prunable_blocks(find_adapter(model))
    pinned = pinned_blocks(model, blocks)
    return sorted(random.Random(seed).sample([b.index for b in blocks if b.index not in pinned], k))


def last_blocks(model: torch.nn.Module, k: int) -> list[int]:
    blocks = prunable_blocks(find_adapter(model))
    pinned = pinned_blocks(model, blocks)
    return [b.index for b in blocks if b.index not in pinned][-k:]


# -- the embedded generators (digits-dit, digits-pixart) ------------------------------------------------
GENERATORS = ("digits-dit", "digits-pixart")


@dataclass(frozen=True)
class GeneratorTask:
    """One embedded generator's evaluation: its conditions (class labels or captions, one per image, seeds
    0..n-1), the block analysis's conditions (other seeds), its call settings and its task metric."""

    model: str
    conditions: list[Any]
    analysis_conditions: list[Any]
    steps: int
    guidance_scale: float

    @property
    def text(self) -> bool:
        return isinstance(self.conditions[0], str)

    def score(self, images: torch.Tensor, conditions: list[Any]) -> dict[str, float]:
        """``judge_accuracy`` (the digit asked for), plus for captions the stated attributes' mean accuracy
        and FID-digits against held-out real digits drawn as the captions say."""
        if not isinstance(conditions[0], str):
            return {"judge_accuracy": judges.judge_accuracy(images, conditions)}
        scores = judges.caption_scores(images, conditions, real_per_prompt=1)
        out = {"judge_accuracy": scores["judge_acc"], "attr_acc": scores["attr_acc"]}
        return {**out, **({"fid_digits": scores["fid_digits"]} if "fid_digits" in scores else {})}


def generator_task(model: str, per_class: int, analysis_per_class: int, steps: int | None) -> GeneratorTask:
    """digits-dit: ``per_class`` images of each digit; digits-pixart: as many captions drawn like its
    training captions (digit, stroke, slant, size, position). Steps and guidance: the model's reported ones
    unless ``steps`` is given."""
    from accel.pipelines import captions, default_generation_kwargs

    defaults = default_generation_kwargs(model)
    n, n_analysis = 10 * per_class, 10 * analysis_per_class
    if model == "digits-pixart":
        conditions = captions.random_prompts(n, seed=2000)
        analysis = captions.random_prompts(n_analysis, seed=3000)
    else:
        conditions = [c for c in range(10) for _ in range(per_class)]
        analysis = [c for c in range(10) for _ in range(analysis_per_class)]
    return GeneratorTask(model, conditions, analysis, steps or int(defaults["steps"]),
                         float(defaults["guidance_scale"]))


def bench_generator(task: GeneratorTask, args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    from accel.calls import build_call
    from accel.pipelines import generate, load

    pipe = load(task.model)
    seeds = list(range(len(task.conditions)))
    gen_kw = {"steps": task.steps, "guidance_scale": task.guidance_scale}
    base_images = generate(pipe, task.conditions, seeds, **gen_kw)
    timing_conditions, timing_seeds = task.conditions[:10], list(range(10))

    def measure(name: str, candidate: Any, ratio: float, removed: list[int], extra: dict | None = None) -> dict:
        images = generate(candidate, task.conditions, seeds, **gen_kw)
        row = {"model": task.model, "variant": name, "ratio": ratio, "removed": removed,
               "parameter_bytes": parameter_bytes(candidate.transformer),
               **task.score(images, task.conditions),
               "psnr_vs_unpruned": metrics.psnr(base_images, images),
               "ssim_vs_unpruned": metrics.ssim(base_images, images), **(extra or {})}
        if args.timing:
            row["timing"] = timed(lambda: generate(candidate, timing_conditions, timing_seeds, **gen_kw),
                                  args.repeats)
        print(json.dumps(row), flush=True)
        return row

    rows = [measure("unpruned", pipe, 0.0, [])]
    analysis_seeds = [1000 + i for i in range(len(task.analysis_conditions))]
    analysis_call = build_call(pipe, task.analysis_conditions, analysis_seeds, task.steps,
                               task.guidance_scale)
    profile = analyze_blocks(pipe, calls=[analysis_call],
                             score=lambda images, calls: task.score(images, task.analysis_conditions))
    profile.save(out / f"sensitivity_{task.model}.json")
    profile.plot(out / f"sensitivity_{task.model}.png")
    (out / f"sensitivity_{task.model}.md").write_text(profile.table() + "\n")
    pool = hp.default_pool(pipe, pipe.transformer, per_class=2, steps=task.steps,
                           guidance_scale=task.guidance_scale)
    for ratio in args.ratios:
        config = hp.HierarchicalPruneConfig(ratio=ratio, distill_steps=args.distill_steps,
                                            distill_minutes=args.distill_minutes)
        percent = round(ratio * 100)
        save = out / f"artifacts/{task.model}-hp{percent}" if ratio == 0.3 else None
        result = hp.prune(pipe, config, profile=profile, pool=pool, save_to=save)
        k = len(result.removed)
        pruned_pipe = result.pipeline(pipe)
        rows.append(measure("hierarchical", pruned_pipe, ratio, result.removed,
                            {"distill": result.distill.to_json() if result.distill else None}))
        if save is not None:
            result.save_pretrained(out / f"{task.model}-hp{percent}", pipe=pipe)
        plain = hp.prune(pipe, config.replace(distill_steps=0), removed=result.removed, analyze=False)
        rows.append(measure("hierarchical-nodistil", plain.pipeline(pipe), ratio, result.removed))
        naive = hp.prune(pipe, config.replace(distill_steps=0), removed=last_blocks(pipe.transformer, k),
                         analyze=False)
        rows.append(measure("naive-last", naive.pipeline(pipe), ratio, naive.removed))
        rnd = hp.prune(pipe, config, removed=random_blocks(pipe.transformer, k, seed=percent),
                       analyze=False, pool=pool)
        rows.append(measure("random+distil", rnd.pipeline(pipe), ratio, rnd.removed,
                            {"distill": rnd.distill.to_json() if rnd.distill else None}))
        if ratio == 0.3:
            import accel
            from accel.methods import quest

            qpipe = result.pipeline(pipe)
            qconfig = quest.QuESTConfig(bits="w4a8", act_granularity="per_token", finetune_iters=0,
                                        keep_float_when_faster=False)  # memory first: every layer 4-bit
            with accel.patch(qpipe, qconfig) as patch:
                q = patch.handle("quest")
                rows.append(measure("hierarchical+int4", qpipe, ratio, result.removed,
                                    {"memory_bytes": q.quant_bytes,
                                     "memory_vs_fp32": q.quant_bytes / rows[0]["parameter_bytes"]}))
    return rows


# -- digits-vit ------------------------------------------------------------------------------------------
def bench_vit(args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    from accel.pipelines import WEIGHTS_DIR, load
    from accel.pipelines.data import load_digit_images

    from accel.prune.distill import InputPool

    model = load("digits-vit")
    kwargs = json.loads((WEIGHTS_DIR / "digits-vit" / "config.json").read_text())["kwargs"]
    size = int(model.patch_embed.img_size[0])
    images, labels = load_digit_images(size, "test")
    train, _ = load_digit_images(size, "train")
    with torch.no_grad():
        base_pred = model(images).argmax(-1)

    def measure(name: str, candidate: torch.nn.Module, ratio: float, removed: list[int], extra: dict | None = None):
        with torch.no_grad():
            pred = candidate(images).argmax(-1)
        row = {"model": "digits-vit", "variant": name, "ratio": ratio, "removed": removed,
               "parameter_bytes": parameter_bytes(candidate), "top1": float((pred == labels).float().mean()),
               "agreement_vs_unpruned": float((pred == base_pred).float().mean()), **(extra or {})}
        if args.timing:
            with torch.no_grad():
                row["timing"] = timed(lambda: candidate(images[:256]), args.repeats * 5)
        print(json.dumps(row), flush=True)
        return row

    rows = [measure("unpruned", model, 0.0, [])]
    profile = analyze_blocks(model, images=images, labels=labels)
    profile.save(out / "sensitivity_digits-vit.json")
    profile.plot(out / "sensitivity_digits-vit.png")
    (out / "sensitivity_digits-vit.md").write_text(profile.table() + "\n")
    pool = InputPool({"x": train})
    for ratio in args.ratios:
        config = hp.HierarchicalPruneConfig(ratio=ratio, distill_steps=args.distill_steps,
                                            distill_minutes=args.distill_minutes, batch_size=64)
        save = out / f"artifacts/digits-vit-hp{round(ratio * 100)}" if ratio == 0.3 else None
        result = hp.prune(model, config, profile=profile, pool=pool, timm_kwargs=kwargs, save_to=save)
        k = len(result.removed)
        rows.append(measure("hierarchical", result.model, ratio, result.removed,
                            {"distill": result.distill.to_json() if result.distill else None}))
        if save is not None:
            result.save_pretrained(out / "digits-vit-hp30")
        plain = hp.prune(model, config.replace(distill_steps=0), removed=result.removed, analyze=False)
        rows.append(measure("hierarchical-nodistil", plain.model, ratio, result.removed))
        naive = hp.prune(model, config.replace(distill_steps=0), removed=last_blocks(model, k), analyze=False)
        rows.append(measure("naive-last", naive.model, ratio, naive.removed))
        rnd = hp.prune(model, config, removed=random_blocks(model, k, seed=round(ratio * 100)), analyze=False,
                       pool=pool)
        rows.append(measure("random+distil", rnd.model, ratio, rnd.removed,
                            {"distill": rnd.distill.to_json() if rnd.distill else None}))
    return rows


# -- latency of an earlier quality run --------------------------------------------------------------------
def retime(args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    """Adds latency to the rows of an earlier ``--no-timing`` run (quality runs and distillation may share a
    loaded machine; timing may not). Latency depends on the pruned structure, not the weights, so each block
    count is measured once on a model with the same blocks removed and undistilled weights."""
    from accel.pipelines import generate, load

    rows = json.loads((out / "prune_results.json").read_text())["rows"]
    measured: dict[tuple[str, int], dict[str, float]] = {}
    for row in rows:
        key = (row["model"], len(row["removed"]))
        if row["variant"].endswith("+int4"):
            continue  # QuEST's own benchmark times quantized execution
        if key not in measured:
            base = load(row["model"])
            config = hp.HierarchicalPruneConfig(ratio=max(row["ratio"], 0.01), distill_steps=0)
            smaller = hp.prune(base, config, removed=row["removed"], analyze=False) if row["removed"] else None
            if row["model"] in GENERATORS:
                pruned = smaller.pipeline(base) if smaller else base
                task = generator_task(row["model"], 1, 1, args.steps)
                call = (task.conditions, list(range(10)), task.steps, task.guidance_scale)
                measured[key] = timed(lambda: generate(pruned, *call), args.repeats)
            else:
                model = smaller.model if smaller else base
                images = torch.rand(256, *_vit_input_shape(model))
                with torch.no_grad():
                    measured[key] = timed(lambda: model(images), args.repeats * 5)
            print(key, measured[key], flush=True)
        row["timing"] = measured[key]
    return rows


def _vit_input_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    size = model.patch_embed.img_size
    return (int(model.patch_embed.proj.in_channels), int(size[0]), int(size[1]))


# -- report ----------------------------------------------------------------------------------------------
def markdown(rows: list[dict[str, Any]], command: str, timing: bool) -> str:
    lines = [f"# HierarchicalPrune benchmark\n\nCommand: `{command}`\n\nTarget: {TARGET}\n"]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        base = mine[0]
        quality = "judge_accuracy" if model in GENERATORS else "top1"
        fidelity = "psnr_vs_unpruned" if model in GENERATORS else "agreement_vs_unpruned"
        captioned = "attr_acc" in base
        extra = " attributes | FID-digits |" if captioned else ""
        lines += [f"## {model}\n", f"| ratio | variant | removed | latency ratio | param bytes | {quality} | "
                  f"drop (points) |{extra} {fidelity} | distil steps / s |",
                  "|---|---|---|---|---|---|---|" + "---|---|" * captioned + "---|---|"]
        for r in mine:
            lat = ""
            if timing and "timing" in r:
                t, b = r["timing"], base["timing"]
                lat = f"{t['median_s'] / b['median_s']:.3f} ({t['min_s']:.3f}-{t['max_s']:.3f} s, n={t['repeats']})"
            d = r.get("distill") or {}
            distil = f"{d['steps']} / {d['seconds']}" if d else ""
            mem = f" (int4: {r['memory_vs_fp32']:.3f}x fp32)" if "memory_vs_fp32" in r else ""
            fid = r.get("fid_digits", float("nan"))
            task_cells = f" {r['attr_acc']:.3f} | {fid:.1f} |" if captioned else ""
            lines.append(f"| {r['ratio']} | {r['variant']} | {r['removed']} | {lat} | {r['parameter_bytes']:,}{mem} | "
                         f"{r[quality]:.3f} | {100 * (base[quality] - r[quality]):+.1f} |{task_cells} "
                         f"{r[fidelity]:.3f} | {distil} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["digits-dit", "digits-pixart", "digits-vit"],
                        choices=["digits-dit", "digits-pixart", "digits-vit"])
    parser.add_argument("--ratios", nargs="*", type=float, default=[0.2, 0.3, 0.4])
    parser.add_argument("--quick", action="store_true", help="smoke run: 30%% only, few images, 20 distil steps")
    parser.add_argument("--no-timing", dest="timing", action="store_false", help="skip latency (loaded machine)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--per-class", type=int, default=10, help="evaluation images per digit")
    parser.add_argument("--analysis-per-class", type=int, default=4, help="images per digit in block analysis")
    parser.add_argument("--steps", type=int, default=None,
                        help="sampler steps (default: each generator's own, digits-dit 50, digits-pixart 20)")
    parser.add_argument("--distill-steps", type=int, default=400)
    parser.add_argument("--distill-minutes", type=float, default=4.0, help="CPU budget per distillation")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench-out/prune")
    parser.add_argument("--retime", action="store_true",
                        help="only add latency to OUT/prune_results.json from an earlier --no-timing run")
    args = parser.parse_args(argv)
    if args.quick:
        args.ratios, args.per_class, args.analysis_per_class = [0.3], 2, 1
        args.distill_steps, args.distill_minutes, args.repeats = 20, 1.0, 1
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m accel.benchmarks.prune_bench " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.retime:
        recorded = json.loads((out / "prune_results.json").read_text())["command"]
        rows = retime(args, out)
        command = f"{recorded}; then {command}"
        (out / "prune_results.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
        (out / "prune_results.md").write_text(markdown(rows, command, True))
        print(f"wrote {out / 'prune_results.md'}")
        return
    rows: list[dict[str, Any]] = []
    from accel.pipelines import WEIGHTS_DIR

    judge = {"digits-dit": "digits-judge", "digits-pixart": "digits-pixart-judge"}
    for name in ("digits-dit", "digits-pixart", "digits-vit"):
        if name not in args.models:
            continue
        needs = [name] + ([judge[name]] if name in judge else [])
        missing = [n for n in needs if not (WEIGHTS_DIR / n).exists()]
        if missing:
            print(f"skipping {name}: embedded weights {missing} not trained yet "
                  "(python -m accel.pipelines.train...)", file=sys.stderr)
            continue
        if name in GENERATORS:
            rows += bench_generator(generator_task(name, args.per_class, args.analysis_per_class, args.steps),
                                    args, out)
        else:
            rows += bench_vit(args, out)
    (out / "prune_results.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    (out / "prune_results.md").write_text(markdown(rows, command, args.timing))
    print(f"wrote {out / 'prune_results.md'}")


if __name__ == "__main__":
    main()
