"""Patched models under torch.compile: same outputs as eager, compute still skipped, and a bounded number of
compiled frames that does not grow from one call to the next (dynamo counters, no timing)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import accel
from tiny import TinyPipe

STEPS = 8


def _compiled_calls(
    method: str | accel.MethodConfig | None, calls: int = 2
) -> tuple[list[int], list[torch.Tensor], torch.Tensor, accel.Patch | None]:
    """Frames compiled after each of ``calls`` compiled 8-step calls, their outputs, the output of an eager
    call of the same patch made just before compiling (after one call, so methods that calibrate online
    already have their schedule) and the patch."""
    pipe = TinyPipe(layers=4)
    patch = accel.patch(pipe, method) if method else None
    pipe([1, 2], num_inference_steps=STEPS)
    eager = pipe([1, 2], num_inference_steps=STEPS)
    torch._dynamo.reset()
    counter = CompileCounter()
    pipe.transformer = torch.compile(pipe.transformer, backend=counter)
    frames, outputs = [], []
    for _ in range(calls):
        outputs.append(pipe([1, 2], num_inference_steps=STEPS))
        frames.append(counter.frame_count)
    return frames, outputs, eager, patch


def test_unpatched_model_compiles_to_one_frame():
    frames, outputs, eager, _ = _compiled_calls(None)
    assert frames == [1, 1]
    torch.testing.assert_close(outputs[1], eager)


@pytest.mark.parametrize("method,bound", [
    ("delta-dit", 6), ("hierarchical-prune", 4), ("bac", 32), ("quest", 4)])
def test_step_decisions_do_not_recompile(method, bound):
    """Decisions are made outside the graph (planned per forward, or compiler-disabled per unit): a bounded
    number of frames, none added by the second call, and the compiled outputs are the eager ones."""
    frames, outputs, eager, patch = _compiled_calls(method)
    assert frames[0] <= bound, frames
    assert frames[1] == frames[0], f"the second call compiled {frames[1] - frames[0]} more frames"
    for got in outputs:
        torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    if method == "delta-dit":
        facts = patch.report().methods["delta-dit"]
        assert facts["compute_fraction_last_call"] < 0.7  # blocks really skipped inside the compiled model
    patch.remove()


@pytest.mark.parametrize("reuse,bound", [("delta", 8), ("x0", 3)])
def test_bac_over_the_whole_stack_compiles_a_bounded_number_of_frames(reuse, bound):
    """With x̂0 reuse the denoiser's hook decides and counts, so the block hooks step aside once calibrated
    and the compiled stack is one graph between the decision and the cache write."""
    frames, outputs, eager, patch = _compiled_calls(accel.BACConfig(granularity="stack", reuse=reuse))
    assert frames[0] <= bound and frames[1] == frames[0], frames
    for got in outputs:
        torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    facts = patch.report().methods["bac"]
    assert facts["compute_fraction_last_call"] == pytest.approx(0.5)  # still skipping, still counted
    assert all("ran 4/4" in line or "ran 0/4" in line for line in facts["per_step"])
    patch.remove()


@pytest.mark.parametrize("method", ["adaspa", "vmoba"])
def test_sparse_attention_runs_eagerly_inside_a_compiled_model(method):
    """The attention hook is compiler-disabled: the block-sparse call runs as in eager mode between compiled
    pieces, a few frames in all whatever the depth, none added by later calls, and the same outputs."""
    import diffusers

    from accel.methods.adaspa import AdaSpaConfig
    from accel.methods.vmoba import VMoBAConfig
    from families import FAMILIES, run_loop

    family = FAMILIES["wan"]
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**{**family.init, "num_layers": 4}).eval()
    config = {"adaspa": AdaSpaConfig(sparsity=0.6, warmup=0.0, search_steps=(0.0, 0.5)),
              "vmoba": VMoBAConfig(chunk_tokens=32, top_k=1, warmup=0.0)}[method]
    patch = accel.patch(model, config)

    def run(m: torch.nn.Module) -> torch.Tensor:
        patch.reset(num_steps=4)
        return run_loop(m, family, steps=4, size=16, frames=family.frames[1])

    eager = run(model)
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    frames = []
    for _ in range(2):
        torch.testing.assert_close(run(compiled), eager, rtol=1e-5, atol=1e-5)
        frames.append(counter.frame_count)
    assert frames[0] <= 6 and frames[1] == frames[0], frames
    assert patch.report().methods[method]["density"] < 1.0
    patch.remove()


@pytest.mark.slow
def test_compile_bench_writes_paired_rows(tmp_path):
    import json

    from accel.benchmarks import compile_bench

    args = "--steps 2 --repeats 1 --backend eager --methods delta-dit --out".split()
    assert compile_bench.main([*args, str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "compile.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["none", "delta-dit"]
    assert rows[0]["frames"] == 1 and not any(r["recompiled_after_warmup"] for r in rows)
    assert rows[1]["max_abs_diff_compiled_vs_eager"] < 1e-5 and rows[1]["compute_fraction"] < 1.0
    assert rows[1]["eager_speedup"] == pytest.approx(rows[1]["eager_none_s"] / rows[1]["eager_s"])
    assert rows[0]["graphs"] == 1 and rows[1]["graphs"] >= 1
    assert all(isinstance(r["compile_s"], float) for r in rows)  # each from a fresh process
    assert rows[1]["compile_s_added"] == pytest.approx(rows[1]["compile_s"] - rows[0]["compile_s"])


@pytest.mark.parametrize("method", [
    "delta-dit", "bac", "adaspa:sparsity=0.6:warmup=0:search_steps=0/0.5",
    "vmoba:chunk_tokens=32:top_k=1:warmup=0", "quest:act_granularity=per_token:finetune_iters=0"])
def test_regional_compile_of_repeated_blocks(method):
    """diffusers' regional compilation (``compile_repeated_blocks``: each transformer block compiled on its
    own) of a patched model: compute still skipped, the eager outputs, a bounded number of frames and none
    added by the second call."""
    import diffusers

    from families import FAMILIES, run_loop

    family = FAMILIES["wan"]
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**{**family.init, "num_layers": 4}).eval()
    patch = accel.patch(model, method)

    def run() -> torch.Tensor:
        patch.reset(num_steps=STEPS)
        return run_loop(model, family, steps=STEPS, size=16, frames=family.frames[1])

    run()
    eager = run()
    torch._dynamo.reset()
    counter = CompileCounter()
    model.compile_repeated_blocks(backend=counter)
    frames = []
    for _ in range(2):
        torch.testing.assert_close(run(), eager, rtol=1e-5, atol=1e-5)
        frames.append(counter.frame_count)
    assert 1 <= frames[0] <= 12 and frames[1] == frames[0], frames
    (facts,) = patch.report().methods.values()
    if "compute_fraction_last_call" in facts:
        assert facts["compute_fraction_last_call"] < 0.8
    if "density" in facts:
        assert facts["density"] < 1.0
    patch.remove()


@pytest.mark.slow
def test_compile_bench_allocator_effect_times_both_sides(capsys):
    from accel.benchmarks import compile_bench

    assert compile_bench.main("--allocator-effect --backend eager --steps 2 --repeats 1".split()) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("eager before a compile ") and " after " in line and " ratio " in line
