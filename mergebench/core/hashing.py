"""Content hashes of input files, so a merge can be reproduced and its inputs verified.

Hashing reads every byte, so results are cached under MERGEBENCH_HOME keyed by (path, size,
mtime, inode); files in the Hugging Face cache are named by their sha256 already and cost nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from pathlib import Path

from mergebench.core.paths import mergebench_home

_CHUNK = 16 * 1024 * 1024
_lock = threading.Lock()
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _cache_file() -> Path:
    return mergebench_home() / "sha256-cache.json"


def _key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


def _load_cache() -> dict[str, str]:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def sha256_file(path: Path) -> str:
    """The file's sha256, from the hub cache's blob name, the hash cache, or by reading it."""
    resolved = path.resolve()
    if _SHA256.match(resolved.name) and resolved.parent.name == "blobs":
        return resolved.name  # huggingface_hub stores LFS files under their sha256
    key = _key(path)
    with _lock:
        cached = _load_cache().get(key)
    if cached:
        return cached
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    with _lock:
        cache = _load_cache()
        cache[key] = digest
        try:
            _cache_file().parent.mkdir(parents=True, exist_ok=True)
            tmp = _cache_file().with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, _cache_file())
        except OSError:
            pass  # a read-only home only costs a rehash next time
    return digest


def combined_sha256(file_hashes: dict[str, str]) -> str:
    """One hash for a model made of several files: sha256 over 'name:hash' lines in name order."""
    lines = "".join(f"{name}:{digest}\n" for name, digest in sorted(file_hashes.items()))
    return hashlib.sha256(lines.encode()).hexdigest()
