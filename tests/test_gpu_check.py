"""benchmarks/gpu_check.py: its dry run (CPU, Triton interpreter, tiny sizes) runs the same code as on a GPU,
so the one-shot check cannot rot while no GPU is lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )


@pytest.mark.slow
def test_dry_run_writes_every_part(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "gc"
    result = _run("--dry-run", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] and report["passed"] and not report["errors"] and not report["skipped"]
    assert {"kernel", "err", "err_torch", "ok"} <= set(report["kernels"][0])
    assert {r["kernel"] for r in report["kernels"]} == {
        "block_sparse_attention", "block_sums", "block_sparse_attention_backward dq",
        "block_sparse_attention_backward dk", "block_sparse_attention_backward dv"}
    assert all(r["ok"] for r in report["kernels"])
    # One attention row per (length, density), each with a consistent fraction of the ideal.
    assert len(report["attention"]) == 2 * 3
    for row in report["attention"]:
        assert row["fraction_of_ideal"] == pytest.approx(row["speedup"] / row["ideal"], rel=1e-2, abs=2e-3)
        assert 0.0 < row["density"] <= 1.0 and row["cosine_vs_dense"] > 0
    assert len(report["training"]) == 3
    for row in report["training"]:
        assert row["fraction_of_ideal"] == pytest.approx(row["speedup"] / row["ideal"], rel=1e-2, abs=2e-3)
    methods = {(r["model"].split(":")[1], r["method"]) for r in report["methods"]}
    assert methods == {
        ("wan-1.3b", "none"),
        ("wan-1.3b", "adaspa"),
        ("wan-1.3b", "delta-dit"),
        ("pixart-xl-512", "none"),
        ("pixart-xl-512", "quest"),
    }
    assert all(r["error"] is None and r["speedup"] > 0 for r in report["methods"])
    assert set(report["part_seconds"]) == {"kernels", "attention", "training", "methods"}
    table = (out / "gpu_check.md").read_text()
    assert "dry run" in table and "## Block-sparse attention vs dense SDPA" in table
    assert "## Training: forward + backward" in table
    assert "shape:wan-1.3b:blocks=2" in table and "quest" in table


def test_refuses_unknown_parts_and_a_missing_gpu(tmp_path):
    result = _run("--parts", "kernels,speed", "--out", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and "unknown part(s) ['speed']" in result.stderr
    if not torch.cuda.is_available():
        result = _run("--out", str(tmp_path), cwd=tmp_path)
        assert result.returncode == 2 and "no CUDA device here; use --dry-run" in result.stderr


def test_checkout_finder_maps_installed_names_to_folders():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    finder = gpu_check._ProjectFinder()
    spec = finder.find_spec("accel.kernels")
    assert Path(spec.origin) == ROOT / "kernels" / "__init__.py"
    assert spec.submodule_search_locations == [str(ROOT / "kernels")]
    assert finder.find_spec("kernels") is None and finder.find_spec("accel.methods") is None
