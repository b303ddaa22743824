"""mergebench: merge language models with pluggable methods and benchmark the merges."""

__version__ = "0.1.0"

from mergebench.core.api import merge  # noqa: E402  (the public Python API)
from mergebench.core.hookspecs import hookimpl  # noqa: E402  (for plugin authors)
from mergebench.core.registry import MergeMethod, Param  # noqa: E402

__all__ = ["__version__", "merge", "hookimpl", "MergeMethod", "Param"]
