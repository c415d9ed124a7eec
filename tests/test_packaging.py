"""Packaging keeps its promises: the wheel holds and imports every module, the library runs on its hard
dependencies alone, and each optional import names an extra that installs it."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from accel.extras import DISTRIBUTIONS, MissingExtraError, require

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGE_DIR: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]
EXTRAS: dict[str, list[str]] = PYPROJECT["project"]["optional-dependencies"]
#: What the extras bring, as import names and distribution names: hidden to stand in for a bare install.
OPTIONAL_MODULES = ["gradio", "gradio_client", "matplotlib", "sklearn", "accelerate", "torchao", "psutil",
                    "cache_dit", "para_attn", "playwright"]
OPTIONAL_DISTS = ["gradio", "gradio-client", "matplotlib", "scikit-learn", "accelerate", "torchao", "psutil",
                  "cache-dit", "para-attn", "playwright"]

#: Prepended to a subprocess: makes the optional modules unimportable and their metadata absent, as if not
#: installed (``find_spec`` returns None, so libraries that probe for them see them missing, not broken).
HIDE_OPTIONAL = f"""
import re, sys
HIDDEN, HIDDEN_DISTS = {OPTIONAL_MODULES!r}, {OPTIONAL_DISTS!r}

class Hide:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN or not hasattr(self.finder, "find_spec"):
            return None
        return self.finder.find_spec(name, path, target)

    def find_distributions(self, *args, **kwargs):
        for dist in getattr(self.finder, "find_distributions", lambda *a, **k: ())(*args, **kwargs):
            if re.sub(r"[-_.]+", "-", (dist.metadata["Name"] or "").lower()) not in HIDDEN_DISTS:
                yield dist

    def __getattr__(self, attr):
        return getattr(self.finder, attr)

sys.meta_path[:] = [Hide(finder) for finder in sys.meta_path]
"""


def _run_python(code: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    # -I: neither the repository nor the working directory on sys.path (the checkout's kernels/ folder
    # would shadow the `kernels` package diffusers probes for)
    result = subprocess.run([sys.executable, "-I", "-c", code], cwd=cwd, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(requirements: list[str]) -> set[str]:
    """Distribution names the requirements install, transitively (installed metadata; this project's own
    extras from pyproject.toml, which an editable install's metadata may predate)."""
    seen: set[str] = set()
    todo = [(Requirement(r), "") for r in requirements]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = _norm(req.name)
        if name == "accel":
            todo += [(Requirement(r), "") for e in req.extras for r in EXTRAS[e]]
            continue
        key = f"{name}[{','.join(sorted(req.extras))}]"
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [(Requirement(r), e) for r in requires for e in ("", *req.extras)]
    return {key.partition("[")[0] for key in seen}


def _require_calls() -> list[tuple[str, str, str]]:
    """``(file, module, extra)`` of every ``require("module", "extra", ...)`` in the packaged folders."""
    calls = []
    for folder in PACKAGE_DIR.values():
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "require"
                        and len(node.args) >= 2 and all(isinstance(a, ast.Constant) for a in node.args[:2])):
                    calls.append((str(path.relative_to(ROOT)), node.args[0].value, node.args[1].value))
    return calls


def _source_files() -> list[Path]:
    """What a checkout holds: tracked files and untracked ones git does not ignore."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True).stdout.decode()
    return [Path(p) for p in out.split("\0") if p and (ROOT / p).is_file()]


def _installed_module(relative: Path) -> str | None:
    """The import name a source file installs under (``kernels/x.py`` -> ``accel.kernels.x``)."""
    for name, folder in sorted(PACKAGE_DIR.items(), key=lambda item: -len(item[1])):
        if relative.parts[0] == folder:
            parts = [*name.split("."), *relative.with_suffix("").parts[1:]]
            return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    return None


def test_require_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    with pytest.raises(MissingExtraError, match=r"scikit-learn is not installed, needed for the digits: "
                                                r"pip install 'accel\[bench\]'") as caught:
        require("sklearn.datasets", "bench", "the digits")
    assert isinstance(caught.value, ImportError) and caught.value.extra == "bench"
    assert require("json", "bench", "nothing") is json


def test_every_require_names_an_extra_that_installs_the_module() -> None:
    calls = _require_calls()
    assert {module.partition(".")[0] for _, module, _ in calls} >= {"gradio", "matplotlib", "sklearn",
                                                                    "accelerate", "torchao"}
    for path, module, extra in calls:
        dist = _norm(DISTRIBUTIONS.get(module.partition(".")[0], module.partition(".")[0]))
        assert extra in EXTRAS, f"{path}: require({module!r}) names extra {extra!r}, not in pyproject"
        assert dist in {_norm(Requirement(r).name) for r in EXTRAS[extra]}, (
            f"{path}: require({module!r}, {extra!r}): [{extra}] does not list {dist}")
    hard = {_norm(Requirement(r).name) for r in PYPROJECT["project"]["dependencies"]}
    assert not hard & {_norm(d) for d in OPTIONAL_DISTS}, "an optional dependency is also a hard one"


def test_all_and_test_extras_cover_the_others() -> None:
    extras = {name: _closure([f"accel[{name}]"]) for name in EXTRAS}
    for name, dists in extras.items():
        assert dists <= extras["all"], f"[all] misses what [{name}] installs: {dists - extras['all']}"
    for name in ("bench", "demo", "peers"):  # the README's test command installs [test] only
        assert extras[name] <= extras["test"], f"[test] misses [{name}]: {extras[name] - extras['test']}"


def test_the_test_extra_installs_what_the_tests_import() -> None:
    installs = _closure([*PYPROJECT["project"]["dependencies"], "accel[test]"])
    local = {p.stem for folder in ("tests", *PACKAGE_DIR.values()) for p in (ROOT / folder).rglob("*.py")}
    local |= {"accel", "tests"}
    owners = importlib.metadata.packages_distributions()
    for path in sorted((ROOT / "tests").glob("*.py")):
        tree = ast.parse(path.read_text())
        fallbacks = {id(n) for h in ast.walk(tree) if isinstance(h, ast.ExceptHandler) for n in ast.walk(h)}
        for node in ast.walk(tree):
            if id(node) in fallbacks:  # `except ImportError: import tomli`: what an older Python needs
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for top in {n.partition(".")[0] for n in names} - local - set(sys.stdlib_module_names):
                dists = {_norm(d) for d in owners.get(top, [])}
                assert dists & installs, f"{path.name} imports {top} ({dists or 'not installed'}), which " \
                                         "neither the dependencies nor [test] install"


@pytest.mark.slow
def test_import_and_patch_without_the_optional_extras(tmp_path: Path) -> None:
    """A bare ``pip install accel``: loading, patching and generating work, accel-bench lists its methods,
    and the parts that need an extra say which."""
    code = HIDE_OPTIONAL + """
import importlib, io, contextlib, sys
import accel
import accel.pipelines
from accel.extras import MissingExtraError
pipe = accel.pipelines.load("digits-dit")
patch = accel.patch(pipe)
images = pipe(class_labels=[3, 7], num_inference_steps=4, output_type="pt").images
assert images.shape[0] == 2, images.shape
patch.remove()
from accel.benchmarks import cli
out = io.StringIO()
with contextlib.redirect_stdout(out):
    assert cli.main(["--list-methods"]) == 0
listed = out.getvalue()
assert "torchao-int8" in listed and "torchao is not installed" in listed and "accel[bench]" in listed, listed
loaded = sorted(m for m in HIDDEN if m in sys.modules)
assert not loaded, loaded
for call, extra in [(lambda: importlib.import_module("accel.demos.app"), "demo"),
                    (lambda: importlib.import_module("accel.pipelines.data").load_digit_images(16), "bench"),
                    (lambda: importlib.import_module("accel.benchmarks.report").write_pareto("x.png", []),
                     "bench"),
                    (lambda: importlib.import_module("accel.demos.render").pareto_figure([]), "demo")]:
    try:
        call()
    except MissingExtraError as exc:
        assert f"pip install 'accel[{extra}]'" in str(exc), exc
    else:
        raise AssertionError(f"no MissingExtraError naming [{extra}]")
err = io.StringIO()
with contextlib.redirect_stderr(err):
    assert cli.main(["--model", "digits-dit", "--methods", "none", "--out", "bench-out"]) == 2
assert "accelerate is not installed" in err.getvalue() and "accel[bench]" in err.getvalue(), err.getvalue()
print("ok")
"""
    assert _run_python(code, tmp_path).stdout.strip().endswith("ok")


@pytest.mark.slow
def test_wheel_holds_and_imports_every_module(tmp_path: Path) -> None:
    """Built from a copy of the checkout (no build/ or egg-info left in it), unpacked, and imported with
    neither the checkout nor the editable install in reach."""
    src, dist, site = tmp_path / "src", tmp_path / "dist", tmp_path / "site"
    files = _source_files()
    for rel in files:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(dist), str(src)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-5000:]
    (wheel,) = dist.glob("accel-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(site)

    expected = {}
    for rel in files:
        module = _installed_module(rel) if rel.suffix == ".py" else None
        if module is not None:
            target = "/".join(module.split(".")) + ("/__init__.py" if rel.name == "__init__.py" else ".py")
            expected[module] = target
    assert len(expected) > 100, "the source walk found too few modules"
    missing = sorted(t for t in expected.values() if t not in names)
    assert not missing, f"the wheel misses {missing}"
    outside = sorted({n.split("/")[0] for n in names} - {"accel", wheel.name.split("-py")[0] + ".dist-info"})
    assert not outside, f"the wheel installs top-level names other than accel: {outside}"
    leftovers = [n for n in names if "-snapshots/" in n or "__pycache__" in n]
    assert not leftovers, f"the wheel ships training checkpoints or caches: {leftovers[:5]}"
    for data in ("accel/kernels/cpu_block_sparse.cpp", "accel/pipelines/weights/digits-dit/model_index.json"):
        assert data in names

    modules = sorted(m for m in expected if not m.endswith("__main__"))  # __main__ runs the CLI on import
    entry_points = (site / next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).read_text()
    scripts = re.findall(r"^\S+ = (\S+):(\w+)$", entry_points, flags=re.M)
    assert ("accel.benchmarks.cli", "main") in scripts and ("accel.demos.app", "main") in scripts
    code = f"""
import importlib, sys
site = {str(site)!r}
sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith("__editable__")
                    and not getattr(f, "__module__", "").startswith("__editable__")]
sys.path.insert(0, site)
for name in {modules!r}:
    module = importlib.import_module(name)
    assert (module.__file__ or "").startswith(site), (name, module.__file__)
for module, attr in {scripts!r}:
    assert callable(getattr(importlib.import_module(module), attr)), (module, attr)
print("imported", len({modules!r}))
"""
    assert f"imported {len(modules)}" in _run_python(code, tmp_path, timeout=180).stdout
