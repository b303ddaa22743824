"""Console helpers shared by the commands: one rich console, quiet third-party libraries."""

from __future__ import annotations

import logging
import os
import warnings

from rich.console import Console

console = Console(stderr=True)


def quiet_libraries() -> None:
    """Silence the progress bars and INFO chatter of transformers, datasets and lm-eval (mergebench shows its own)."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("lm_eval", "lm-eval", "transformers", "datasets", "accelerate", "evaluate", "absl"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lm_eval")
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:
        pass
