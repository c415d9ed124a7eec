"""Reading accel's saved files (BAC schedules, QuEST and HierarchicalPrune artifacts, sensitivity
profiles) and the folders they come from, with errors that name the file and say how to remake it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from accel.errors import ArtifactMismatchError


def read_json(path: str | Path, what: str, remake: str) -> dict[str, Any]:
    """The JSON object in ``path``. A file that is not JSON, or not an object, raises
    :class:`ArtifactMismatchError` naming the file, ``what`` it should be and how to ``remake`` it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ArtifactMismatchError(f"{path} is not a {what}: it is not UTF-8 text. {remake}") from None
    except json.JSONDecodeError as exc:
        raise ArtifactMismatchError(
            f"{path} is not a {what}: invalid JSON ({exc.msg}: line {exc.lineno}, column {exc.colno}). "
            f"{remake}"
        ) from None
    if not isinstance(data, dict):
        raise ArtifactMismatchError(f"{path} is not a {what}: it holds a JSON {type(data).__name__}, not an "
                                    f"object. {remake}")
    return data
