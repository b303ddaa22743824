"""SIGKILL a run with the default worker pool at known points (base preparation, expert training, an
evaluation, a merge) and at seeded random times; every resume must end with the same results database as a
run never interrupted, and at no moment may a unit be half-recorded."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path


from toy_study import EXAMPLE, plugin_env, write_config

TESTS = Path(__file__).resolve().parent

PAUSE_CONFIG = dict(
    seeds=[0], n_experts=[2], methods=["task_arithmetic", "pause_average"],
    search={"task_arithmetic": {"lambda": [0.5, 1.0]}},
    bases=[{"size": "toy", "kind": "pretrained", "preparer": "pause_init"},
           {"size": "toy", "kind": "instruction_tuned", "preparer": "toy_shift", "from": "pretrained"}],
    expert_trainer="pause_finetune", multitask="toy_finetune", evaluator="pause_score")


def env_for(home: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, **plugin_env(home), **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env["PYTHONPATH"]])
    env["MERGEBENCH_PLUGINS"] = "mergebench_toy_study,toy_pause"
    return env


def start(config: Path, run_dir: Path, env: dict) -> subprocess.Popen:
    # its own process group: the kill takes the runner and its worker processes at once, as a lost machine would
    return subprocess.Popen([sys.executable, "-m", "mergebench", "run", str(config), "--run-dir", str(run_dir),
                             "--no-leaderboard"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)


def kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def finish(config: Path, run_dir: Path, env: dict) -> None:
    proc = start(config, run_dir, env)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-3000:]


def contents(run_dir: Path, home: Path) -> dict[str, list]:
    """Everything the database records, without timings, versions and the run's and cache's own paths."""
    conn = sqlite3.connect(run_dir / "results.sqlite")
    out = {
        "units": conn.execute("SELECT key, kind, spec, output FROM units ORDER BY key").fetchall(),
        "scores": conn.execute("SELECT * FROM scores ORDER BY model, split, dataset").fetchall(),
        "examples": conn.execute("SELECT * FROM examples ORDER BY model, split, dataset").fetchall(),
        "sweep_points": conn.execute("SELECT * FROM sweep_points ORDER BY unit, params").fetchall(),
        "merges": conn.execute("SELECT seed, size, base_kind, n, method, experts, params, validation_held_in, "
                               "held_in, held_out, normalised, model FROM merges ORDER BY seed, base_kind, n, method"
                               ).fetchall(),
        "models": [tuple(str(v).replace(str(home), "HOME").replace(str(run_dir), "RUN") for v in r)
                   for r in conn.execute("SELECT * FROM models ORDER BY key").fetchall()],
    }
    conn.close()
    return out


def assert_consistent(run_dir: Path) -> None:
    """No unit is half-recorded: each recorded unit has all its results, and no result lacks its unit."""
    if not (run_dir / "results.sqlite").exists():
        return
    conn = sqlite3.connect(run_dir / "results.sqlite")
    units = {k: kind for k, kind in conn.execute("SELECT key, kind FROM units")}
    sweeps = {k for k, kind in units.items() if kind == "sweep"}
    pointed = {u for (u,) in conn.execute("SELECT DISTINCT unit FROM sweep_points")}
    assert pointed == sweeps
    assert conn.execute("SELECT count(*) FROM merges").fetchone()[0] == len(sweeps)
    evaluated = {(m, s) for m, s in conn.execute("SELECT DISTINCT model, split FROM scores WHERE model NOT LIKE 'merge-%'")}
    recorded = {(k.split(":")[1], k.split(":")[2]) for k, kind in units.items() if kind == "evaluation"}
    assert evaluated == recorded
    # every score has its per-example values, written in the same transaction
    scored = conn.execute("SELECT model, split, dataset FROM scores ORDER BY 1, 2, 3").fetchall()
    assert conn.execute("SELECT model, split, dataset FROM examples ORDER BY 1, 2, 3").fetchall() == scored
    conn.close()


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended before reaching {path.name}: {proc.stderr.read().decode()[-2000:]}"
        assert time.time() < deadline, f"the run never reached {path.name}"
        time.sleep(0.02)


def test_sigkill_at_every_phase_then_resume_gives_the_uninterrupted_results(tmp_path):
    if str(EXAMPLE) not in sys.path:
        sys.path.insert(0, str(EXAMPLE))
    home = tmp_path / "home"
    config = write_config(tmp_path / "c.yaml", **PAUSE_CONFIG)

    # the reference: one run, never interrupted (its own cache, so nothing it does is shared)
    started = time.perf_counter()
    finish(config, tmp_path / "reference", env_for(tmp_path / "reference-home"))
    whole = time.perf_counter() - started
    print(f"uninterrupted run: {whole:.1f} s")
    reference = contents(tmp_path / "reference", tmp_path / "reference-home")
    assert len(reference["merges"]) == 2 * 2

    run_dir, markers = tmp_path / "run", tmp_path / "markers"
    markers.mkdir()
    for phase in ("prepare", "train", "evaluate", "merge"):
        proc = start(config, run_dir, env_for(home, TOY_PAUSE_AT=phase, TOY_PAUSE_DIR=str(markers)))
        wait_for(markers / phase, proc)
        kill(proc)
        assert_consistent(run_dir)
    rng = random.Random(16)
    for _ in range(2):  # and at seeded random moments of whatever the run is doing then
        proc = start(config, run_dir, env_for(home))
        time.sleep(rng.uniform(0.2, 1.0) * whole)
        if proc.poll() is None:
            kill(proc)
        assert_consistent(run_dir)
    finish(config, run_dir, env_for(home))
    assert_consistent(run_dir)
    resumed = contents(run_dir, home)
    for table in reference:
        assert resumed[table] == reference[table], table
