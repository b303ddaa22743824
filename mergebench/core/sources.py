"""Built-in model resolution: local directories and files, then the local Hugging Face cache."""

from __future__ import annotations

from pathlib import Path

from mergebench.core.hookspecs import hookimpl
from mergebench.core.tensor_io import ModelSource, open_hub_cached, open_local


@hookimpl(trylast=True)
def resolve_model(reference: str, allow_pickle: bool) -> ModelSource | None:
    """Local paths win; a reference that is no local path is looked up as a hub id in the local cache."""
    path = Path(reference).expanduser()
    if path.exists() or reference.startswith((".", "/", "~")):
        return open_local(reference, path, allow_pickle)
    return open_hub_cached(reference, allow_pickle) or open_local(reference, path, allow_pickle)
