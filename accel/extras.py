"""Optional dependencies, imported where they are used, with an error that says which extra installs them.

``import accel`` and ``accel.patch`` need only the hard dependencies; the benchmark, the demo and their
figures need more (pyproject's ``[project.optional-dependencies]``). A missing one fails at first use with
the ``pip install 'accel[<extra>]'`` command that brings it, instead of a bare ``No module named``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: Import names whose distribution is called otherwise (what ``pip install`` needs to hear).
DISTRIBUTIONS = {"sklearn": "scikit-learn", "cache_dit": "cache-dit", "para_attn": "para-attn"}


class MissingExtraError(ImportError):
    """An optional dependency is not installed (or does not import); the message names the extra."""

    def __init__(self, message: str, *, module: str, extra: str) -> None:
        super().__init__(message, name=module)
        self.extra = extra


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` (dotted names too), or raise :class:`MissingExtraError` saying it is needed for
    ``purpose`` and that ``pip install 'accel[<extra>]'`` installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.partition(".")[0]
        dist = DISTRIBUTIONS.get(top, top)
        missing = exc.name is not None and exc.name.partition(".")[0] == top
        state = "is not installed" if missing else f"failed to import ({exc})"
        raise MissingExtraError(f"{dist} {state}, needed for {purpose}: pip install 'accel[{extra}]'",
                                module=module, extra=extra) from exc
