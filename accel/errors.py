"""Exceptions that speak the user's language: what was wrong, what is accepted, what to do."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class AccelError(Exception):
    """Base class of every error accel raises on purpose."""


class UnknownMethodError(AccelError, ValueError):
    """A method name that no registered method carries."""


class UnsupportedModelError(AccelError, TypeError):
    """A target accel has no adapter for, or that a method cannot apply to."""


class IncompatibleMethodsError(AccelError, ValueError):
    """Methods that cannot be composed in one patch."""


class AlreadyPatchedError(AccelError, RuntimeError):
    """A target that already carries an accel patch."""


class ArtifactMismatchError(AccelError, ValueError):
    """An artifact (schedule, quantizer scales, pruned weights) that belongs to another model or setting."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest choice, or an empty string."""
    normalized = name.replace("_", "-").lower()
    matches = difflib.get_close_matches(normalized, list(choices), n=1, cutoff=0.5)
    return f" Did you mean '{matches[0]}'?" if matches else ""
