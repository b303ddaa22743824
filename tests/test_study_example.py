"""The study plugin example, installed the way users install it (an entry point), runs a whole study from
examples/configs/toy-study.yaml through the real command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO

EXAMPLE = REPO / "examples" / "mergebench-study-example"


def test_installed_study_plugin_runs_from_its_config(tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(EXAMPLE)], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "MERGEBENCH_HOME": str(tmp_path / "home")}
    env.pop("MERGEBENCH_LOAD_PLUGINS", None)
    env.pop("MERGEBENCH_PLUGINS", None)

    def mb(*args):
        return subprocess.run([sys.executable, "-m", "mergebench", *map(str, args)], capture_output=True, text=True,
                              env=env)

    plugins = json.loads(mb("plugins", "--json").stdout)
    toy = next(p for p in plugins if p["name"] == "toy-study")
    assert {"register_suites", "register_base_preparers", "register_expert_trainers",
            "register_evaluators"} <= set(toy["hooks"]) and toy["distribution"] == "mergebench-toy-study"
    done = mb("run", REPO / "examples" / "configs" / "toy-study.yaml", "--run-dir", tmp_path / "run", "--workers", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(mb("leaderboard", tmp_path / "run", "--format", "json").stdout)
    assert {r["method"] for r in rows if r["kind"] == "merge"} == {"average", "task_arithmetic", "ties"}
    assert len([r for r in rows if r["kind"] == "merge"]) == 2 * 2 * 3  # base kinds x N values x methods
    import sqlite3

    with sqlite3.connect(tmp_path / "run" / "results.sqlite") as conn:
        versions = json.loads(conn.execute("SELECT value FROM meta WHERE key = 'versions'").fetchone()[0])
    assert versions["plugin:toy-study"] == "mergebench-toy-study 0.1.0"  # the plugin's version is recorded
