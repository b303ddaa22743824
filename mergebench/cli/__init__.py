"""The command line: click commands, rich output."""

import os

# lm-eval and datasets draw tqdm bars per task and per request; the CLI shows its own rich progress.
# tqdm reads this when it is imported, so it is set before anything imports it.
os.environ.setdefault("TQDM_DISABLE", "1")
