"""Per-example results: the metric's value on every evaluated example, kept beside each score.

An evaluator may return :class:`mergebench.study.components.Scores` (lm-eval's adapter does, from its
per-sample log): for each dataset, one value per example in the dataset's order, whose mean is the
dataset's score. :func:`collect` checks that contract; the run records the values in its results database
(table ``examples``, keyed by model, split and dataset like ``scores``, in the same transaction as the
scores) and the evaluation cache keeps them beside ``score.json`` (``examples.npy``), so a cached
evaluation brings them back. Statistics (:mod:`mergebench.study.statistics`) are then recomputed from the
run directory alone.

Storage: ``u1`` (one byte per example) when every value is 0 or 1 (accuracy, exact match), else ``f4``
(little-endian float32: about 7 significant digits, far below any example's contribution to a mean).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from mergebench.core.errors import PluginError

TABLE = """
CREATE TABLE IF NOT EXISTS examples (
    model TEXT NOT NULL, split TEXT NOT NULL, dataset TEXT NOT NULL, count INTEGER NOT NULL, dtype TEXT NOT NULL,
    data BLOB NOT NULL, PRIMARY KEY (model, split, dataset));
"""
FILE = "examples.npy"


def collect(evaluator: str, scores: Mapping[str, float]) -> tuple[dict[str, float], dict[str, np.ndarray] | None]:
    """An evaluator's result for one model as (scores, per-example values or None), checked: every dataset's
    values are finite and average to its score."""
    examples = getattr(scores, "examples", None) or {}
    plain = {d: float(s) for d, s in scores.items()}
    out: dict[str, np.ndarray] = {}
    for dataset, values in examples.items():
        if dataset not in plain:
            raise PluginError(f"evaluator '{evaluator}' returned per-example values for '{dataset}' but no score for it")
        arr = np.asarray(values, dtype=float).ravel()
        if arr.size == 0 or not np.all(np.isfinite(arr)):
            raise PluginError(f"evaluator '{evaluator}': the per-example values of '{dataset}' must be a non-empty "
                              f"list of finite numbers")
        mean, score = float(arr.mean()), plain[dataset]
        if abs(mean - score) > 1e-9 + 1e-6 * abs(score):
            raise PluginError(f"evaluator '{evaluator}': the per-example values of '{dataset}' average {mean:.6g} but "
                              f"its score is {score:.6g}; a dataset's score must be the mean of its examples' values")
        out[dataset] = arr
    return plain, (out or None)


def encode(values: np.ndarray) -> tuple[str, bytes]:
    arr = np.asarray(values, dtype=float)
    if np.all((arr == 0) | (arr == 1)):
        return "u1", arr.astype("u1").tobytes()
    return "f4", arr.astype("<f4").tobytes()


def decode(dtype: str, data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype={"u1": "u1", "f4": "<f4"}[dtype]).astype(float)


def statements(model: str, split: str, examples: Mapping[str, np.ndarray] | None) -> list[tuple[str, tuple]]:
    """The rows of ``examples`` for one model's evaluation (none when the evaluator gave no per-example values)."""
    out = []
    for dataset, values in (examples or {}).items():
        dtype, data = encode(values)
        out.append(("INSERT OR REPLACE INTO examples VALUES (?, ?, ?, ?, ?, ?)",
                    (model, split, dataset, len(values), dtype, data)))
    return out


def read(db: Any, model: str, split: str) -> dict[str, np.ndarray]:
    """One model's recorded per-example values on ``split``: dataset -> array (empty when none were recorded)."""
    rows = db.rows("SELECT dataset, dtype, data FROM examples WHERE model = ? AND split = ?", (model, split))
    return {r["dataset"]: decode(r["dtype"], r["data"]) for r in rows}


# ---- the evaluation cache -----------------------------------------------------------------------------

def write_file(directory: Path, values: np.ndarray) -> None:
    dtype, _ = encode(values)
    np.save(Path(directory) / FILE, np.asarray(values).astype({"u1": "u1", "f4": "<f4"}[dtype]), allow_pickle=False)


def read_file(directory: Path) -> np.ndarray | None:
    path = Path(directory) / FILE
    return np.load(path, allow_pickle=False).astype(float) if path.is_file() else None
