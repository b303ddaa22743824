"""Where mergebench keeps its caches: ``MERGEBENCH_HOME``, else the user's cache directory."""

from __future__ import annotations

import os
from pathlib import Path


def mergebench_home() -> Path:
    env = os.environ.get("MERGEBENCH_HOME")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mergebench"
