"""The repository keeps its promises: CI runs the README's test command."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text, flags=re.S)


def test_ci_runs_the_readme_test_command():
    main_job, test_command = readme_commands()[:2]
    ci_lines = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert ci_lines == [test_command]
    assert "accel-bench" in main_job


def test_no_top_level_kernels_or_pipelines_package():
    text = (ROOT / "pyproject.toml").read_text()
    assert '"accel.kernels" = "kernels"' in text and '"accel.pipelines" = "pipelines"' in text
    assert not re.search(r'packages = \[[^\]]*"(kernels|pipelines)"', text)


def _import_from_root(code: str, extra_path: Path | None = None) -> str:
    """Run ``code`` the way ``python -m ...`` from the repository root runs: the root first on sys.path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def test_the_root_kernels_folder_yields_to_an_installed_kernels_distribution(tmp_path: Path):
    # transformers imports the `kernels` distribution when it is installed; run from the repository root,
    # the root's kernels/ folder comes first on sys.path and must not take its place.
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("WHO = 'installed'\n")
    code = ("import kernels, accel.kernels; "
            "print(kernels.WHO, accel.kernels.block_sums_reference.__name__)")
    assert _import_from_root(code, tmp_path) == "installed block_sums_reference"


def test_transformers_imports_from_the_repository_root():
    assert _import_from_root("from transformers import PreTrainedModel; print('ok')") == "ok"
