"""Run files: atomic writes (a reader or a resumed run sees the old file or the new one, never
half of one) and the one reader of a run's `summary.json`."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    # pid + random suffix: two processes (or threads) writing the same file never share a temp file.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, data: Any, indent: int | None = 2) -> None:
    write_text_atomic(path, json.dumps(data, indent=indent) + "\n")


def read_completed_summary(run_dir: str | Path, steps: int | None = None) -> dict[str, Any] | None:
    """The run's summary.json if the run completed (and, when `steps` is given, ran that many
    steps); None for a missing, unreadable or unfinished summary."""
    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("status") != "completed":
        return None
    if steps is not None and summary.get("steps") != steps:
        return None
    return summary
