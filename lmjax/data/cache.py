"""Content-keyed cache folders under `data.cache_dir`, published atomically.

A cache entry is a folder named by a hash of everything its content depends on. It is built in
a private temporary folder and renamed into place, so a run killed mid-build leaves no
half-written entry, and two runs building the same entry at once both end up using one complete
copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def cache_key(**parts: Any) -> str:
    """Short hex digest of `parts` (JSON-serialisable values), independent of argument order."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_folder(cache_dir: str | Path, kind: str, key: str, build: Callable[[Path], None]) -> tuple[Path, bool]:
    """Returns (`cache_dir/kind/key`, whether it was built now), calling `build(tmp)` if it is absent.

    `build` writes the entry's files into the empty folder it is given.
    """
    final = Path(cache_dir).expanduser() / kind / key
    if final.is_dir():
        return final, False
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not "another process published it first"
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, True
