"""accel-bench: parsing and its errors, a tiny end-to-end run, sweep selection, accelerate gathering."""

from __future__ import annotations

import json
import statistics
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from accel.benchmarks.cli import main
from accel.benchmarks.runner import RECORD_FIELDS, Record, select_fastest
from accel.benchmarks.spec import parse_item, parse_methods


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random-init DigitsDiTPipeline saved as a local diffusers folder (loads like a real checkpoint)."""
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    from accel.pipelines.digits_dit import DigitsDiTPipeline

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1, num_layers=4,
        sample_size=16, patch_size=4, num_embeds_ada_norm=10, norm_num_groups=1,
    )
    folder = tmp_path_factory.mktemp("tiny-dit")
    DigitsDiTPipeline(transformer, DDIMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    return folder


def test_unknown_method_did_you_mean():
    with pytest.raises(ValueError, match=r"Unknown method 'delta_dit'\. Did you mean 'delta-dit'\?"):
        parse_item("delta_dit")


def test_bad_setting_key_and_value():
    with pytest.raises(ValueError, match=r"DeltaDiTConfig has no setting 'speed'"):
        parse_item("delta-dit:speed=2")
    with pytest.raises(ValueError, match=r"DeltaDiTConfig.interval must be an int, got 'fast'"):
        parse_item("delta-dit:interval=fast")
    with pytest.raises(ValueError, match=r"settings are written key=value"):
        parse_item("delta-dit:interval")


def test_all_expands_and_none_comes_first():
    methods = parse_methods("bac,all", ["delta-dit", "bac"])
    assert [m.label for m in methods] == ["none", "bac", "delta-dit"]
    composed = parse_item("delta-dit:interval=3+bac")
    assert composed.family == "delta-dit+bac" and composed.swept


def test_missing_model_path_is_clear(capsys, tmp_path):
    code = main(["--model", str(tmp_path / "nope"), "--methods", "none", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "nope" in capsys.readouterr().err


def test_sweep_picks_fastest_meeting_floor():
    def rec(method, latency, psnr):
        return Record(model="m", method=method, settings=f"{latency}", steps=1, batch=1, latency_s=latency, psnr=psnr)

    records = [rec("none", 1.0, None), rec("a", 0.5, 25.0), rec("a", 0.6, 31.0), rec("a", 0.8, 40.0),
               rec("b", 0.4, 20.0), rec("b", 0.3, 10.0)]
    select_fastest(records, 30.0)
    chosen = {(r.method, r.latency_s) for r in records if r.selected}
    assert chosen == {("none", 1.0), ("a", 0.6), ("b", 0.4)}
    assert any("no setting reached PSNR >= 30.0" in note for r in records for note in r.notes)
    # The paired speedup decides, not the latency: the host slows down during a long sweep.
    drifted = [rec("a", 0.5, 35.0), rec("a", 0.7, 36.0)]
    drifted[0].speedup, drifted[1].speedup = 2.0, 2.5
    select_fastest(drifted, 30.0)
    assert [r.selected for r in drifted] == [False, True]


def test_timed_calls_alternate_with_unaccelerated_ones():
    """A B A B: the method comes off for each baseline call and back on (one untimed call to record)
    for each timed call; a method that cannot re-attach is timed first, then the baseline."""
    from accel.benchmarks.runner import Applied, timed_pairs

    log: list[str] = []
    state = {"on": True}

    class FakeWorkload:
        def run_batch(self, batch):
            log.append("method" if state["on"] else "none")

    def attach() -> Applied:
        state["on"] = True
        return Applied(remove=lambda: state.update(on=False), report=lambda: {"compute_fraction": 0.5},
                       reattach=attach)

    applied, pairs = timed_pairs(FakeWorkload(), attach(), [(0, 0)], repeats=3)
    assert log == ["none", "method", "method"] * 3 and len(pairs) == 3
    assert state["on"] and applied.report() == {"compute_fraction": 0.5}
    log.clear()
    fixed = Applied(remove=lambda: state.update(on=False), report=lambda: {"bits": 8})
    applied, pairs = timed_pairs(FakeWorkload(), fixed, [(0, 0)], repeats=2)
    assert log == ["method", "method", "none", "none"] and not state["on"]
    assert applied.report() == {"bits": 8}


def test_end_to_end_writes_every_field(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["--model", str(tiny_model_dir), "--methods", "none,delta-dit,bac:updates=2", "--steps", "4",
                 "--labels", "0,1,2", "--batch", "2", "--repeats", "2", "--warmup", "1", "--out", str(out)])
    assert code == 0
    data = json.loads((out / "results.json").read_text())
    assert data["environment"]["command"].startswith("accel-bench")
    records = data["records"]
    assert [r["method"] for r in records] == ["none", "delta-dit", "bac"]
    for r in records:
        assert set(RECORD_FIELDS) <= set(r) and r["error"] is None
        assert r["latency_s"] > 0 and r["speedup"] > 0 and r["params_bytes"] > 0
        assert 0.0 <= r["judge_acc"] <= 1.0
    assert records[0]["psnr"] is None and records[0]["speedup"] == 1.0
    # Each method's speedup is the median ratio of its own pairs of back-to-back calls (none, method).
    for r in records[1:]:
        assert len(r["pairs"]) == 2 and r["baseline_latency_s"] > 0
        ratios = [base / t for base, t in r["pairs"]]
        assert r["speedup"] == pytest.approx(statistics.median(ratios))
        assert r["speedup_spread"] == pytest.approx(max(ratios) - min(ratios))
        assert r["baseline_latency_s"] == pytest.approx(statistics.median(b for b, _ in r["pairs"]))
    assert records[1]["psnr"] > 0 and records[1]["compute_fraction"] < 1.0
    assert any("calibrated itself with 1 call(s) of its own" in note for note in records[2]["notes"])
    assert (out / "pareto.png").stat().st_size > 0 and (out / "results.md").exists()
    assert "delta-dit" in capsys.readouterr().out


def test_default_runs_the_recipe_accel_patch_picks(tiny_model_dir, tmp_path):
    """``default`` is ``accel.patch(pipe)`` with no method named; its record names the recipe that ran."""
    from accel.api import DEFAULT_DENOISER_RECIPE

    assert parse_item("default").family == "default"
    out = tmp_path / "out"
    assert main(["--model", str(tiny_model_dir), "--methods", "none,default", "--steps", "4", "--labels", "0,1",
                 "--batch", "2", "--repeats", "1", "--warmup", "0", "--sweep", "--out", str(out)]) == 0
    record = json.loads((out / "results.json").read_text())["records"][1]
    assert record["method"] == "default" and record["error"] is None
    recipe = DEFAULT_DENOISER_RECIPE[0]  # DDIM names its prediction type: the x̂0 recipe
    assert record["settings"] == "bac:granularity=stack:weighting=snr:reuse=x0" and recipe.endswith("reuse=x0")
    assert record["compute_fraction"] < 1.0 and record["psnr"] > 0


@pytest.mark.slow
def test_accelerate_two_processes_gather_same_records(tiny_model_dir, tmp_path):
    args = ["--model", str(tiny_model_dir), "--methods", "none,delta-dit", "--steps", "3", "--labels", "0-3",
            "--batch", "1", "--repeats", "1"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "accel.benchmarks", *args,
         "--out", str(tmp_path / "two")],
        check=True, env=env, timeout=600, capture_output=True,
    )
    one = json.loads((tmp_path / "one/results.json").read_text())
    two = json.loads((tmp_path / "two/results.json").read_text())
    assert two["environment"]["processes"] == 2
    keys = ("model", "method", "settings", "psnr", "ssim", "judge_acc", "compute_fraction")
    assert [{k: r[k] for k in keys} for r in one["records"]] == [{k: r[k] for k in keys} for r in two["records"]]


def test_without_sweep_every_point_is_reported(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["--model", str(tiny_model_dir), "--methods", "none,delta-dit,delta-dit:interval=3", "--steps", "3",
                 "--labels", "0", "--repeats", "1", "--out", str(out)]) == 0
    records = json.loads((out / "results.json").read_text())["records"]
    assert len(records) == 3 and all(r["selected"] for r in records)


def test_attention_share_counts_only_the_sdpa_kernels():
    # a model whose every step is one SDPA call and one matmul: attention is a real, partial share
    from accel.benchmarks.attention_share import attention_share

    q = torch.randn(1, 2, 256, 32)
    w = torch.randn(512, 512)

    def call():
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
        return w @ w

    attention, total = attention_share(call)
    assert 0 < attention < total


def test_attention_share_profiles_a_published_shape():
    from accel.benchmarks.attention_share import attention_share, sampling_call

    attention, total = attention_share(sampling_call("shape:wan-1.3b:blocks=1:frames=1:latent=8", 1))
    assert 0 < attention < total


@pytest.mark.parametrize("shape", [(3, 1, 16, 16), (3, 3, 12, 20), (2, 4, 1, 8, 8)])
def test_grid_cell_equals_the_image_it_shows(tmp_path, shape):
    """Each row of the benchmark grid shows every sample once, pixel for pixel (enlarged 4x)."""
    import numpy as np
    from PIL import Image

    from accel.benchmarks.report import write_grid

    outputs = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    write_grid(tmp_path / "grid.png", {"none": outputs, "other": 1 - outputs}, scale=4)
    grid = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB")).astype(int)
    cells = list(outputs) if outputs.dim() == 4 else [frame for video in outputs for frame in video]
    h, w = cells[0].shape[-2:]
    for row, sign in enumerate((0, 1)):
        y = row * (4 * h + 4)  # rows 4 px apart
        for i, cell in enumerate(cells):
            x = 150 + i * 4 * (w + 1)  # samples one (enlarged) white column apart
            expect = (cell if sign == 0 else 1 - cell).expand(3, -1, -1).permute(1, 2, 0).numpy()
            shown = grid[y : y + 4 * h : 4, x : x + 4 * w : 4]
            assert np.abs(shown - np.round(expect * 255)).max() <= 1, (row, i)
            assert (grid[y : y + 4 * h, x + 4 * w : x + 4 * w + 4] == 255).all()  # the gap is white


def test_grid_labels_break_a_method_spec_at_its_separators():
    """A row's label shows the whole spec on lines that fit the label column, not its first 24 characters."""
    from accel.benchmarks.report import LABEL_CHARS, label_lines

    assert label_lines("none") == ["none"]
    assert label_lines("quest:keep_float_when_faster=False") == ["quest:", "keep_float_when_faster=", "False"]
    spec = "bac:granularity=stack:weighting=snr:update_fraction=0.5:reuse=x0"
    lines = label_lines(spec, max_lines=8)
    assert "".join(lines) == spec and all(len(line) <= LABEL_CHARS for line in lines)
    short = label_lines(spec, max_lines=2)
    assert len(short) == 2 and short[-1].endswith("...") and len(short[-1]) <= LABEL_CHARS
    assert "".join(label_lines("x" * 60, max_lines=8)) == "x" * 60


def test_pareto_front_keeps_only_undominated_points():
    from accel.benchmarks.report import pareto_front

    points = [(1.0, 50.0), (2.0, 30.0), (1.5, 20.0), (3.0, 25.0), (2.5, 35.0), (3.0, 10.0)]
    assert pareto_front(points) == [(1.0, 50.0), (2.5, 35.0), (3.0, 25.0)]
    assert pareto_front([]) == []
