"""The merge-speed benchmark's smoke mode runs, so the benchmark cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_merge_speed_quick_runs_and_reports(tmp_path):
    out = tmp_path / "quick.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "merge_speed.py"), "--quick", "--no-mergekit",
                           "--workdir", str(tmp_path / "work"), "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    rows = {r["method"]: r for r in results["rows"]}
    assert set(rows) == {"average", "task_arithmetic", "ties", "dare_ties"}
    for row in rows.values():
        assert row["mergebench"]["seconds"] > 0 and row["mergebench"]["peak_bytes"] > 0
        assert row["output_bytes"] > 0.9 * 2 * 1.0e6  # ~1M bf16 parameters
    assert results["floor"]["smoke/2"]["input_bytes"] > 3 * 2.0e6
    assert results["threads"][0]["identical"] is True
    assert "| smoke | 2 | ties |" in done.stdout
