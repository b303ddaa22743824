"""The run's results database (SQLite, in the run directory).

Every completed unit of work is written in one transaction: its row in ``units`` and its results
(scores, per-example values, sweep points, the chosen merge: ``merges`` for a sweep's first random
draw, ``draws`` for the further draws of a stochastic method under ``draws: K``) together, so a run
killed at any moment (SIGKILL included) either has a unit entirely or not at all, and the next ``mergebench run`` skips exactly the units that completed. WAL journaling keeps
readers (``mergebench leaderboard``) working while a run writes.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable

from mergebench.study import per_example

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS units (
    key TEXT PRIMARY KEY, kind TEXT NOT NULL, spec TEXT NOT NULL, output TEXT,
    seconds REAL NOT NULL, finished REAL NOT NULL, versions TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS models (
    key TEXT PRIMARY KEY, role TEXT NOT NULL, seed INTEGER NOT NULL, size TEXT NOT NULL, base_kind TEXT,
    category TEXT, path TEXT NOT NULL, sha256 TEXT);
CREATE TABLE IF NOT EXISTS scores (
    model TEXT NOT NULL, split TEXT NOT NULL, dataset TEXT NOT NULL, score REAL NOT NULL,
    PRIMARY KEY (model, split, dataset));
CREATE TABLE IF NOT EXISTS sweep_points (
    unit TEXT NOT NULL, params TEXT NOT NULL, held_in REAL, scores TEXT NOT NULL,
    PRIMARY KEY (unit, params));
CREATE TABLE IF NOT EXISTS merges (
    seed INTEGER NOT NULL, size TEXT NOT NULL, base_kind TEXT NOT NULL, n INTEGER NOT NULL, method TEXT NOT NULL,
    experts TEXT NOT NULL, params TEXT NOT NULL, validation_held_in REAL,
    held_in REAL, held_out REAL, normalised TEXT NOT NULL, model TEXT NOT NULL,
    seconds REAL NOT NULL, PRIMARY KEY (seed, size, base_kind, n, method));
CREATE TABLE IF NOT EXISTS draws (
    seed INTEGER NOT NULL, size TEXT NOT NULL, base_kind TEXT NOT NULL, n INTEGER NOT NULL, method TEXT NOT NULL,
    draw INTEGER NOT NULL, merge_seed INTEGER NOT NULL, experts TEXT NOT NULL, params TEXT NOT NULL,
    validation_held_in REAL, held_in REAL, held_out REAL, normalised TEXT NOT NULL, model TEXT NOT NULL,
    seconds REAL NOT NULL, PRIMARY KEY (seed, size, base_kind, n, method, draw));
""" + per_example.TABLE


class ResultsDB:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")  # a completed unit survives a power cut too
        self.conn.executescript(SCHEMA)

    def close(self) -> None:
        self.conn.close()

    def done(self, key: str) -> bool:
        return self.conn.execute("SELECT 1 FROM units WHERE key = ?", (key,)).fetchone() is not None

    def unit_output(self, key: str) -> Any:
        row = self.conn.execute("SELECT output FROM units WHERE key = ?", (key,)).fetchone()
        return None if row is None or row["output"] is None else json.loads(row["output"])

    def complete(self, key: str, kind: str, spec: dict, output: Any, seconds: float, versions: dict,
                 statements: Iterable[tuple[str, tuple]] = ()) -> None:
        """Record a unit and its results in one transaction."""
        with self.transaction():
            for sql, args in statements:
                self.conn.execute(sql, args)
            self.conn.execute("INSERT OR REPLACE INTO units VALUES (?, ?, ?, ?, ?, ?, ?)",
                              (key, kind, json.dumps(spec, sort_keys=True, default=str),
                               json.dumps(output, default=str), seconds, time.time(), json.dumps(versions)))

    def transaction(self):
        conn = self.conn

        class _Tx:
            def __enter__(self):
                conn.execute("BEGIN IMMEDIATE")

            def __exit__(self, exc_type, *_):
                conn.execute("ROLLBACK" if exc_type else "COMMIT")

        return _Tx()

    def set_meta(self, key: str, value: Any) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value, default=str)))

    def meta(self, key: str) -> Any:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row["value"])

    def scores(self, model: str, split: str) -> dict[str, float]:
        rows = self.conn.execute("SELECT dataset, score FROM scores WHERE model = ? AND split = ?", (model, split))
        return {r["dataset"]: r["score"] for r in rows}

    def rows(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        return list(self.conn.execute(sql, args))


def score_statements(model: str, split: str, scores: dict[str, float]) -> list[tuple[str, tuple]]:
    return [("INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?)", (model, split, d, s)) for d, s in scores.items()]
