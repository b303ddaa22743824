"""A content-addressed cache of built artefacts (suite data, tokenizers, bases, experts, evaluations).

An entry's key is a hash of everything that determines it (kind, plugin and version, parameters,
seed, and the keys of the artefacts it was built from), so a change to any of them builds a new entry
and an unchanged recipe is free. Entries are built in a temporary directory and renamed into place,
so an interrupted build never leaves a partial entry; a per-key lock stops two processes from
building the same entry at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from mergebench.core.paths import mergebench_home

MANIFEST = "mergebench-artifact.json"


def cache_key(kind: str, spec: dict[str, Any]) -> str:
    """A stable hash of ``kind`` and a JSON-serialisable ``spec`` (key order does not matter)."""
    payload = json.dumps({"kind": kind, "spec": spec}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


class ArtifactCache:
    """Directories under ``root/kind/key``; see the module docstring."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else mergebench_home() / "artifacts"

    def path(self, kind: str, spec: dict[str, Any]) -> Path:
        return self.root / kind / cache_key(kind, spec)

    def get(self, kind: str, spec: dict[str, Any]) -> Path | None:
        path = self.path(kind, spec)
        return path if (path / MANIFEST).is_file() else None

    @contextmanager
    def _lock(self, path: Path) -> Iterator[None]:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def get_or_build(self, kind: str, spec: dict[str, Any], build: Callable[[Path], Any]) -> Path:
        """The entry for (kind, spec), calling ``build(tmp_dir)`` to create it if missing."""
        path = self.path(kind, spec)
        if (path / MANIFEST).is_file():
            return path
        with self._lock(path):
            if (path / MANIFEST).is_file():  # another process built it while we waited
                return path
            tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
            tmp.mkdir(parents=True)
            try:
                build(tmp)
                (tmp / MANIFEST).write_text(json.dumps({"kind": kind, "key": path.name, "spec": spec},
                                                       indent=2, sort_keys=True, default=str))
                if path.exists():  # a stale entry without a manifest: an interrupted older layout
                    shutil.rmtree(path)
                os.rename(tmp, path)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return path
