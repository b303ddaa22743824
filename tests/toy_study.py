"""The example study plugin (examples/mergebench-study-example) for tests: how to load it, its config, and an
independent re-implementation of its scoring, so tests compute every expected number by hand."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO

EXAMPLE = REPO / "examples" / "mergebench-study-example"
MODULE = "mergebench_toy_study"

CONFIG = {
    "suite": "toy-study",
    "seeds": [0, 1],
    "n_experts": [2, 4],
    "methods": ["average", "task_arithmetic", "ties"],
    "search": {"task_arithmetic": {"lambda": [0.4, 0.6, 0.8, 1.0]},
               "ties": {"lambda": [0.6, 1.0], "density": [0.3, 0.6]}},
    "bases": [{"size": "toy", "kind": "pretrained", "preparer": "toy_init"},
              {"size": "toy", "kind": "instruction_tuned", "preparer": "toy_shift", "from": "pretrained"}],
    "expert_trainer": "toy_finetune",
    "multitask": "toy_finetune",
    "evaluator": "toy_score",
    # workers: 2 is the default: the process pool every user's run takes
}
SHARPNESS = 4.0  # toy_score's default


def plugin_env(home: Path) -> dict[str, str]:
    """Environment that loads the example plugin in this process and in every worker it starts."""
    path = os.pathsep.join(filter(None, [str(EXAMPLE), os.environ.get("PYTHONPATH", "")]))
    return {"PYTHONPATH": path, "MERGEBENCH_PLUGINS": MODULE, "MERGEBENCH_HOME": str(home)}


def write_config(path: Path, **changes) -> Path:
    path.write_text(yaml.safe_dump({**CONFIG, **changes}))
    return path


def rows(run_dir: Path, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
    with sqlite3.connect(run_dir / "results.sqlite") as conn:
        conn.row_factory = sqlite3.Row
        return conn.execute(sql, args).fetchall()


# ---- an independent re-implementation of the toy suite's scoring ---------------------------------------

def weights(model_dir: Path) -> torch.Tensor:
    return load_file(Path(model_dir) / "model.safetensors")["w"].double()


def split_rows(suite_dir: Path) -> dict[tuple[str, str], dict]:
    """(dataset, split) -> its one JSONL row, read from the built suite's files."""
    out = {}
    for f in Path(suite_dir).glob("toy_*.jsonl"):
        dataset, split, _ = f.name.split(".")
        out[(dataset, split)] = json.loads(f.read_text().splitlines()[0])
    return out


def example_scores(w: torch.Tensor, row: dict) -> list[float]:
    """Each entry of the dataset's block is one example: 1 / (1 + sharpness * its squared distance to the target)."""
    target = torch.tensor(row["target"], dtype=torch.float64)
    dim = len(target)
    block = w[row["block"] * dim:(row["block"] + 1) * dim]
    return [float(1.0 / (1.0 + SHARPNESS * (b - t) ** 2)) for b, t in zip(block.tolist(), target.tolist())]


def score(w: torch.Tensor, row: dict) -> float:
    values = example_scores(w, row)
    return sum(values) / len(values)
