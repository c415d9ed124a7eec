"""The repository keeps its promises: CI runs the README's test command."""

from __future__ import annotations

import re
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
