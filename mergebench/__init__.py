"""mergebench: merge language models with pluggable methods and benchmark the merges."""

__version__ = "0.1.0"

from mergebench.core.api import merge  # noqa: E402  (the public Python API)

__all__ = ["__version__", "merge"]
