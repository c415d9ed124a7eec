"""Shape-true workloads: published denoiser sizes, random-init, timed by accel-bench without quality."""

from __future__ import annotations

import json

import pytest
from accel.benchmarks.cli import main
from accel.benchmarks.shapes import SHAPES, ShapePipeline, parse_shape

import accel


def test_published_sizes_and_token_counts():
    widths = {name: s.config["num_attention_heads"] * s.config["attention_head_dim"] for name, s in SHAPES.items()}
    assert widths == {"pixart-xl-512": 1152, "sd3-medium": 1536, "flux-dev": 3072, "wan-1.3b": 1536,
                      "hunyuan-video": 3072}
    tokens = {name: s.tokens() for name, s in SHAPES.items()}
    assert tokens == {"pixart-xl-512": 1024, "sd3-medium": 4096, "flux-dev": 4096, "wan-1.3b": 32760,
                      "hunyuan-video": 118800}
    spec = parse_shape("shape:wan-1.3b:blocks=4:latent=16:frames=3")
    assert spec.config()["num_layers"] == 4 and spec.latent == (16, 3, 16, 16)
    assert "4 blocks at full width, 192 tokens per sample" in spec.describe()


@pytest.mark.parametrize("text, message", [
    ("shape:sdxl", "Unknown shape workload 'shape:sdxl'; accepted: shape:pixart-xl-512"),
    ("shape:pixart-xl-512:blocks=0", r"Bad setting 'blocks=0'.*blocks=N, latent=S, frames=F"),
    ("shape:pixart-xl-512:depth=2", "Bad setting 'depth=2'"),
    ("shape:pixart-xl-512:frames=2", "image model: frames= does not apply"),
])
def test_bad_shape_names_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        parse_shape(text)


@pytest.mark.parametrize("name", ["pixart-xl-512:latent=8", "sd3-medium:latent=8", "wan-1.3b:latent=8:frames=2"])
def test_one_block_at_full_width_runs_and_patches(name):
    pipe = ShapePipeline(parse_shape(f"shape:{name}:blocks=1"))
    out = pipe(2, [0])
    assert out.shape[0] == 1 and out.isfinite().all()
    with accel.patch(pipe) as patch:
        pipe(4, [0])
        assert "compute_fraction" in patch.report().methods["bac"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["flux-dev:latent=8", "hunyuan-video:latent=8:frames=1"])
def test_widest_shapes_build_and_step(name):
    pipe = ShapePipeline(parse_shape(f"shape:{name}:blocks=1"))
    assert pipe(1, [0]).isfinite().all()


def test_bench_times_a_shape_and_says_quality_is_not_measured(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--model", "shape:pixart-xl-512:blocks=2:latent=8", "--methods", "none,bac", "--steps", "4",
                 "--repeats", "1", "--warmup", "0", "--out", str(out)]) == 0
    records = json.loads((out / "results.json").read_text())["records"]
    assert [r["method"] for r in records] == ["none", "bac"]
    for r in records:
        assert r["error"] is None and r["psnr"] is None and r["speedup"] > 0 and r["params_bytes"] > 0
        assert any("quality not measured" in note for note in r["notes"])
    assert records[1]["compute_fraction"] < 1.0
    assert "quality: not measured on shape workloads" in capsys.readouterr().err


@pytest.mark.slow
def test_quest_width_benchmark_runs_and_reports(tmp_path):
    """The real-width QuEST benchmark at a tiny token count: every requested variant gets a row with its
    speed against fp32 (paired), its cosine to the fp32 output and its bytes."""
    from accel.benchmarks import quest_width

    quest_width.main(["--model", "shape:pixart-xl-512:blocks=1:latent=8", "--variants",
                      "fp32,bf16,w8a8,w4a16", "--repeats", "1", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "quest_width.json").read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["fp32", "bf16", "w8a8", "w4a16"]
    assert rows["w8a8"]["cosine_vs_fp32"] > 0.99 and rows["w4a16"]["cosine_vs_fp32"] > 0.95
    assert rows["w4a16"]["bytes_vs_fp32"] < 0.3
    # W8A8 layers stay float where no integer kernel on this CPU is correct and faster (AVX2-only CPUs at
    # this tiny token count); the row must then say so, and hold the float bytes
    if rows["w8a8"]["kept_float"]:
        assert "kept in" in rows["w8a8"]["kept_float"] and rows["w8a8"]["bytes_vs_fp32"] <= 1.0
    else:
        assert rows["w8a8"]["bytes_vs_fp32"] < 0.4
    assert all(r["speedup_vs_fp32"] > 0 and "speedup_vs_bf16" in r for r in rows.values())
    assert "| w4a16 |" in (tmp_path / "quest_width.md").read_text()
