"""Building accel's C++ CPU extensions on first use: one lazily built, cached module per source file.

Each extension is compiled with torch's C++ toolchain (``torch.utils.cpp_extension``) for this machine's CPU
(``-march=native``; the build name carries a hash of the CPU's flags, the source and the torch version, so a
cache shared with another CPU type never loads a binary it cannot run). A build needs a C++ compiler and
ninja; when it fails the reason is kept (:attr:`CppExtension.failure`), logged once, never retried in the
process, and callers take their pure-PyTorch path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The running CPU's feature flags (x86 ``flags`` or Arm ``Features`` in /proc/cpuinfo; empty if
    unreadable): what ``-march=native`` builds for and what accel's kernels choose by."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


# x86 features with bf16 dot-product instructions: only with them does a bf16 GEMM beat converting to fp32.
BF16_DOT_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def bf16_dot_products() -> bool:
    """The running CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16)."""
    return bool(cpu_flags() & BF16_DOT_FLAGS)


def _ensure_ninja_on_path() -> None:
    """torch's builder runs ``ninja`` from PATH; a venv's python run without activating the venv does not have
    the venv's ``bin`` (where the ``ninja`` package puts it) on PATH."""
    if shutil.which("ninja"):
        return
    candidates = [str(Path(sys.executable).parent)]
    try:
        import ninja  # type: ignore[import-not-found]

        candidates.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    os.environ["PATH"] = os.pathsep.join([*candidates, os.environ.get("PATH", "")])


class CppExtension:
    """The extension built from ``source`` (a ``.cpp`` beside this file), loaded on first :meth:`load`."""

    def __init__(self, source: str, what: str, fallback: str) -> None:
        self.source = Path(__file__).with_name(source)
        self.what = what  # for messages: "the CPU block-sparse kernel"
        self.fallback = fallback  # what callers use instead: "the gather path"
        self.module: Any = None
        self.failure: str | None = None
        self._lock = threading.Lock()
        self.build: Callable[[], Any] = self._build

    def tag(self) -> str:
        source = self.source.read_bytes() if self.source.exists() else b""
        cpu = (platform.machine() + " ".join(sorted(cpu_flags()))).encode()
        return hashlib.sha1(cpu + source + torch.__version__.encode()).hexdigest()[:10]

    def _build(self) -> Any:
        from torch.utils.cpp_extension import load

        _ensure_ninja_on_path()
        logger.info("accel: building %s (once per machine, ~30 s)", self.what)
        return load(
            name=f"accel_{self.source.stem}_{self.tag()}",
            sources=[str(self.source)],
            # -fopenmp: at::parallel_for is an OpenMP region only when the extension is built with it; the
            # runtime resolves to the libgomp torch already loaded (same soname), so there is one thread pool.
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )

    def load(self) -> Any:
        """The compiled module, building it on first call; ``None`` (and :attr:`failure` set) if the build
        fails. Thread-safe."""
        with self._lock:
            if self.module is None and self.failure is None:
                try:
                    self.module = self.build()
                except Exception as exc:  # noqa: BLE001 - any build failure: use the fallback, say so once
                    text = str(exc).strip()
                    self.failure = f"{type(exc).__name__}: {text.splitlines()[-1] if text else ''}"
                    logger.warning("accel: %s did not build (%s); using %s.", self.what, self.failure,
                                   self.fallback)
            return self.module

    def available(self) -> bool:
        return self.load() is not None

    def require(self) -> Any:
        """The module, or a clear error naming why it is unavailable."""
        module = self.load()
        if module is None:
            raise RuntimeError(f"{self.what} is unavailable ({self.failure}).")
        return module
