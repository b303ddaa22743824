"""`mergebench run`: config validation, a whole tiny study, resume after SIGKILL, the run lock,
the leaderboard formats and the CI gate."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from mergebench.cli.main import cli
from mergebench.study.runner import expert_order, grid_for

from test_cli_errors import assert_user_error

# A study small enough for tests: 2 experts, 3 methods with small grids, a few training steps.
TINY = {
    "suite_params": {"train": 200, "validation": 16, "test": 16},
    "n_experts": [2],
    "methods": ["average", "task_arithmetic", "ties"],
    "search": {"task_arithmetic": {"lambda": [0.5, 1.0]}, "ties": {"lambda": [0.5, 1.0], "density": [0.2]}},
    "pretrain": {"steps": 20},
    "instruction_tune": {"steps": 5},
    "expert": {"steps": 6},
    "multitask": {"steps": 6},
    "workers": 1,
}


def write_config(path: Path, **changes) -> Path:
    """TINY with ``changes``; a key changed to None is left out."""
    path.write_text(yaml.safe_dump({k: v for k, v in {**TINY, **changes}.items() if v is not None}))
    return path


def run_cli(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One finished tiny study: (run_dir, home, config path)."""
    root = tmp_path_factory.mktemp("study")
    home = root / "home"
    config = write_config(root / "tiny.yaml")
    result = run_cli("run", config, "--run-dir", root / "run", env={"MERGEBENCH_HOME": str(home)})
    assert result.exit_code == 0, result.output
    return root / "run", home, config


def db_rows(run_dir: Path, sql: str):
    with sqlite3.connect(run_dir / "results.sqlite") as conn:
        return conn.execute(sql).fetchall()


# ---- config ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes, fragments", [
    ({"methds": ["ties"]}, ["unknown key 'methds'", "did you mean 'methods'"]),
    ({"methods": ["tie"]}, ["unknown merge method 'tie'", "did you mean 'ties'"]),
    ({"n_experts": [9]}, ["n_experts 9 is outside 2..8"]),
    ({"sizes": ["huge"]}, ["unknown size 'huge'"]),
    ({"expert": {"steps": 0}}, ["steps", ">= 1"]),
    ({"search": {"ties": {"lamda": [1.0]}}}, ["unknown parameter 'lamda'"]),
    ({"search": {"ties": {"density": [1.5]}}}, ["density"]),
    ({"workers": 0}, ["workers must be an integer >= 1"]),
    ({"calibration": {"split": "test"}}, ["calibration.split must be train or validation", "no method may learn"]),
    ({"calibration": {"sampels": 4}}, ["unknown key 'sampels'", "did you mean 'samples'"]),
    ({"base_kinds": ["chat"]}, ["unknown base kind 'chat'"]),
    ({"executor": "slurmm"}, ["unknown executor 'slurmm'"]),
    ({"executor": {"name": "ray", "params": {"adress": "auto"}}}, ["unknown parameter 'adress'", "did you mean 'address'"]),
    ({"evaluator": "lm-evl"}, ["unknown evaluator 'lm-evl'", "did you mean 'lm-eval'"]),
    ({"expert_trainer": {"name": "hf_trainer", "params": {"stepz": 3}}}, ["unknown parameter 'stepz'"]),
    ({"bases": [{"size": "x", "kind": "pretrained", "preparer": "lod"}], "pretrain": None, "instruction_tune": None}, ["unknown base preparer 'lod'"]),
    ({"bases": [{"size": "x", "kind": "it", "preparer": "instruction_tune"}], "pretrain": None, "instruction_tune": None}, ["starts from another base", "from:"]),
    ({"bases": [{"size": "x", "kind": "it", "preparer": "load", "from": "pretrained"}], "pretrain": None, "instruction_tune": None}, ["no earlier entry"]),
    ({"bases": [{"size": "x", "preparer": "load"}], "pretrain": {"steps": 3}}, ["'bases' replaces 'pretrain'"]),
    ({"device": "tpu"}, ["device must be"]),
])
def test_bad_configs_fail_before_any_work(tmp_path, changes, fragments):
    config = write_config(tmp_path / "c.yaml", **changes)
    result = run_cli("run", config, "--run-dir", tmp_path / "run")
    assert_user_error(result, *fragments)
    assert not (tmp_path / "run").exists()  # nothing started


def test_init_writes_the_default_config_commented(tmp_path, pm):
    from mergebench.study.config import RunConfig, parse

    path = tmp_path / "mergebench.yaml"
    assert run_cli("init", path).exit_code == 0
    text = path.read_text()
    assert text.count("#") > 15
    assert parse(yaml.safe_load(text), pm).to_dict() == parse({}, pm).to_dict()  # the example is the default
    assert RunConfig().methods == ["average", "task_arithmetic", "ties", "dare_ties"]
    assert_user_error(run_cli("init", path), "exists")


def test_grids_and_expert_order(pm):
    ties = pm.merge_methods().get("ties")
    grid = grid_for(ties, None)
    assert len(grid) == 11 * 2 and {p["density"] for p in grid} == {0.1, 0.2}
    assert sorted({p["lambda"] for p in grid}) == pytest.approx([i / 10 for i in range(11)])
    assert grid_for(ties, {"density": [0.3]})[0] == {"density": 0.3, "lambda": 0.0}
    assert grid_for(pm.merge_methods().get("average"), None) == [{}]
    cats = list(pm.suites().get("micro-t0").held_in)
    assert expert_order(cats, 0) == expert_order(cats, 0) and sorted(expert_order(cats, 0)) == sorted(cats)
    assert expert_order(cats, 0) != expert_order(cats, 1)


# ---- a whole study --------------------------------------------------------------------------------

def test_study_records_every_unit_and_result(study):
    run_dir, _, _ = study
    kinds = dict(db_rows(run_dir, "SELECT kind, count(*) FROM units GROUP BY kind"))
    # only the experts a merge uses are trained (N = 2: the first 2 of the seed's order):
    # 2 bases x (2 experts + multitask + base) = 8 models on test, 4 experts on validation; 2 x 3 sweeps
    assert kinds == {"evaluation": 12, "sweep": 6}
    trained = db_rows(run_dir, "SELECT base_kind, category FROM models WHERE role = 'expert' ORDER BY category")
    order = expert_order(list(json.loads(db_rows(run_dir, "SELECT value FROM meta WHERE key = 'suite'")[0][0])
                              ["held_in"]), 0)
    assert sorted({c for _, c in trained}) == sorted(order[:2]) and len(trained) == 4
    merges = db_rows(run_dir, "SELECT base_kind, n, method, params, held_in, held_out, experts FROM merges")
    assert len(merges) == 6
    for kind, n, method, params, held_in, held_out, experts in merges:
        assert n == 2 and len(json.loads(experts)) == 2
        assert held_in is None or held_in >= 0
        if method == "task_arithmetic":
            assert json.loads(params)["lambda"] in (0.5, 1.0)
    points = dict(db_rows(run_dir, "SELECT unit, count(*) FROM sweep_points GROUP BY unit").__iter__())
    assert sorted(points.values()) == [1, 1, 2, 2, 2, 2]  # average, task arithmetic, ties grids
    # the chosen point is the best validation point
    for unit, in db_rows(run_dir, "SELECT key FROM units WHERE kind = 'sweep'"):
        best = db_rows(run_dir, f"SELECT max(held_in) FROM sweep_points WHERE unit = '{unit}'")[0][0]
        chosen = json.loads(db_rows(run_dir, f"SELECT output FROM units WHERE key = '{unit}'")[0][0])["params"]
        assert chosen is not None and best is not None
    merged = sorted((run_dir / "merges").iterdir())
    assert len(merged) == 6 and all((m / "mergebench.json").is_file() for m in merged)
    assert (run_dir / "leaderboard.md").read_text().count("| tiny |") == 6 + 6  # merges + 3 baselines x 2


def test_rerun_redoes_nothing(study):
    run_dir, home, config = study
    before = db_rows(run_dir, "SELECT key, finished FROM units ORDER BY key")
    started = time.perf_counter()
    result = run_cli("run", config, "--run-dir", run_dir, env={"MERGEBENCH_HOME": str(home)})
    assert result.exit_code == 0, result.output
    assert db_rows(run_dir, "SELECT key, finished FROM units ORDER BY key") == before
    assert time.perf_counter() - started < 30


def assert_chosen_point_is_the_written_merge(run_dir: Path, home: Path, method: str) -> dict:
    """Re-scoring the written merge on validation gives the chosen sweep point's scores; returns its params."""
    row = db_rows(run_dir, "SELECT m.path, u.key FROM merges g JOIN models m ON m.key = g.model "
                           f"JOIN units u ON u.key LIKE 'sweep:%' || g.base_kind || ':2:{method}:%' "
                           f"WHERE g.method = '{method}' AND g.base_kind = 'pretrained'")[0]
    path, unit = row
    chosen = json.loads(db_rows(run_dir, f"SELECT output FROM units WHERE key = '{unit}'")[0][0])["params"]
    point = [(json.loads(p), json.loads(s)) for p, s in
             db_rows(run_dir, f"SELECT params, scores FROM sweep_points WHERE unit = '{unit}'")
             if all(chosen[k] == v for k, v in json.loads(p).items())][0][1]
    suite = sum((["--suite-param", f"{k}={v}"] for k, v in TINY["suite_params"].items()), [])
    result = run_cli("eval", path, "--split", "validation", "--json", *sum((["--dataset", d] for d in point), []),
                     *suite, env={"MERGEBENCH_HOME": str(home)})
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output[result.output.index("{"):])["scores"][path]
    assert scores == pytest.approx(point, abs=1e-9)
    return chosen


def test_sweep_point_matches_the_engine_merge(study):
    """The in-memory sweep and the written merge agree: re-scoring the written model on validation gives the
    chosen point's scores."""
    run_dir, home, _ = study
    assert assert_chosen_point_is_the_written_merge(run_dir, home, "ties")["trim_scope"] == "tensor"


def test_a_method_with_a_whole_model_pre_pass_is_swept_through_the_engine(study, tmp_path):
    """TIES trimmed over the whole task vector cannot be merged tensor by tensor in memory: its grid points are
    merged by the engine (models come from the study's cache, so only the sweep runs)."""
    _, home, _ = study
    config = write_config(tmp_path / "global.yaml", methods=["ties"],
                          search={"ties": {"lambda": [0.5, 1.0], "density": [0.2], "trim_scope": ["global"]}},
                          base_kinds=["pretrained"])
    result = run_cli("run", config, "--run-dir", tmp_path / "run", env={"MERGEBENCH_HOME": str(home)})
    assert result.exit_code == 0, result.output
    assert len(db_rows(tmp_path / "run", "SELECT * FROM sweep_points")) == 2
    assert assert_chosen_point_is_the_written_merge(tmp_path / "run", home, "ties")["trim_scope"] == "global"
    assert not list((tmp_path / "run").rglob(".*-point-*"))  # scratch merges are gone


def test_data_aware_methods_calibrate_each_expert_on_its_own_categorys_train_split(study, tmp_path):
    """RegMean and Fisher take part in a study: each expert's statistics come from its own category's train data
    (never test), the in-memory sweep and the written merge get the same statistics, and both reach the
    leaderboard."""
    from mergebench.core import calibration
    from mergebench.training import read_pairs

    _, home, _ = study
    config = write_config(tmp_path / "data-aware.yaml", methods=["regmean", "fisher"], base_kinds=["pretrained"],
                          search={"regmean": {"alpha": [0.5, 1.0]}},
                          calibration={"split": "train", "samples": 12, "max_length": 48})
    run_dir = tmp_path / "run"
    result = run_cli("run", config, "--run-dir", run_dir, env={"MERGEBENCH_HOME": str(home)})
    assert result.exit_code == 0, result.output
    assert sorted(m for m, in db_rows(run_dir, "SELECT method FROM merges")) == ["fisher", "regmean"]
    board = (run_dir / "leaderboard.md").read_text()
    assert "| regmean |" in board and "| fisher |" in board
    assert assert_chosen_point_is_the_written_merge(run_dir, home, "regmean")["alpha"] in (0.5, 1.0)
    suite = json.loads(db_rows(run_dir, "SELECT value FROM meta WHERE key = 'suite'")[0][0])
    categories = expert_order(list(suite["held_in"]), 0)[:2]
    for method in ("regmean", "fisher"):
        path, = db_rows(run_dir, "SELECT m.path FROM merges g JOIN models m ON m.key = g.model "
                                 f"WHERE g.method = '{method}'")[0]
        record = json.loads((Path(path) / "mergebench.json").read_text())
        assert [c["expert"] for c in record["calibration"]] == [1, 2]
        assert {c["statistic"] for c in record["calibration"]} == {"gram" if method == "regmean" else "fisher"}
        assert record["calibration"][0]["sha256"] != record["calibration"][1]["sha256"]
        for entry, category in zip(record["calibration"], categories):
            assert entry["parameters"] == {"samples": 12, "max_length": 48, "batch_size": 8, "seed": 0}
            data = calibration.CalibrationData.parse({"data": entry["data"]})
            train = [only(home.glob(f"artifacts/suite/*/{d}.train.jsonl")) for d in suite["held_in"][category]]
            assert train and list(data.rows) == read_pairs(train)


def only(paths):
    paths = list(paths)
    assert len(paths) == 1, paths
    return paths[0]


def test_second_run_on_the_same_directory_is_refused(study, tmp_path):
    import fcntl

    run_dir, home, config = study
    with open(run_dir / ".lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running `mergebench run` holds it
        result = subprocess.run([sys.executable, "-m", "mergebench", "run", str(config), "--run-dir",
                                 str(run_dir)], capture_output=True, text=True, env={**os.environ, "MERGEBENCH_HOME": str(home)})
        fcntl.flock(fh, fcntl.LOCK_UN)
    assert result.returncode == 2
    assert "another mergebench run is using this directory" in result.stderr and "Traceback" not in result.stderr


def test_sigkill_then_resume_loses_nothing(study, tmp_path):
    """Kill a run (SIGKILL) once some sweeps are recorded; the rerun keeps those rows and finishes the rest."""
    _, home, _ = study  # artefacts cached: this run spends its time on evaluations and sweeps
    config = write_config(tmp_path / "c.yaml", methods=["average", "task_arithmetic", "ties", "dare_ties"],
                          search={**TINY["search"], "dare_ties": {"lambda": [0.5, 1.0], "density": [0.2]}})
    run_dir = tmp_path / "run"
    env = {**os.environ, "MERGEBENCH_HOME": str(home)}
    cmd = [sys.executable, "-m", "mergebench", "run", str(config), "--run-dir", str(run_dir)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 900  # generous: a loaded CI machine evaluates slowly
    done_before: list = []
    while time.time() < deadline:
        if (run_dir / "results.sqlite").exists():
            try:
                done_before = db_rows(run_dir, "SELECT key, finished FROM units WHERE kind = 'sweep'")
            except sqlite3.OperationalError:
                done_before = []
            if len(done_before) >= 2:
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 2 <= len(done_before) < 8, "the run should be killed part-way through its sweeps"
    survived = db_rows(run_dir, "SELECT key, finished FROM units WHERE kind = 'sweep'")
    assert set(done_before) <= set(survived)
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    after = dict(db_rows(run_dir, "SELECT key, finished FROM units WHERE kind = 'sweep'"))
    assert len(after) == 8
    assert all(after[k] == f for k, f in survived)  # completed units were not redone
    assert len(db_rows(run_dir, "SELECT * FROM merges")) == 8
    assert not list((run_dir / "merges").glob(".*tmp*"))  # no half-written merge left behind


# ---- leaderboard ----------------------------------------------------------------------------------

def test_leaderboard_formats(study, tmp_path):
    run_dir, _, _ = study
    records = json.loads(run_cli("leaderboard", run_dir, "--format", "json").output)
    merges = [r for r in records if r["kind"] == "merge"]
    assert len(merges) == 6 and {r["method"] for r in records if r["kind"] == "baseline"} == {"base", "experts", "multitask"}
    assert all(r["held_in"]["n"] == 1 for r in merges)
    experts = [r for r in records if r["method"] == "experts"]
    assert all(r["held_in"]["mean"] == 1.0 for r in experts)  # by definition
    base = [r for r in records if r["method"] == "base"]
    assert all(r["held_out"]["mean"] == pytest.approx(1.0) for r in base if r["held_out"]["mean"] is not None)
    csv_text = run_cli("leaderboard", run_dir, "--format", "csv", "--base-kind", "pretrained").output
    assert csv_text.splitlines()[0].startswith("size,base_kind,n,method") and len(csv_text.splitlines()) == 1 + 6
    md = run_cli("leaderboard", run_dir, "--format", "markdown", "--method", "ties").output
    assert "| tiny | pretrained | 2 | ties |" in md and "| average |" not in md
    html_path = tmp_path / "lb.html"
    assert run_cli("leaderboard", run_dir, "--format", "html", "-o", html_path).exit_code == 0
    page = html_path.read_text()
    assert page.count("<svg") == 4 and "http" not in page.replace("http://www.w3.org/2000/svg", "")
    table = run_cli("leaderboard", run_dir).output
    assert "task_arithmetic" in table and "baseline" in table
    assert_user_error(run_cli("leaderboard", tmp_path / "nowhere"), "no results database")


def test_ci_gate(study, tmp_path):
    run_dir, _, _ = study
    baseline = tmp_path / "baseline.json"
    assert run_cli("leaderboard", run_dir, "--save-baseline", baseline, "--format", "json").exit_code == 0
    saved = json.loads(baseline.read_text())
    assert len(saved["rows"]) == 6
    ok = run_cli("leaderboard", run_dir, "--check", baseline, "--format", "json")
    assert ok.exit_code == 0
    key = "tiny/pretrained/N=2/ties"
    value = saved["rows"][key]["held_out"]
    saved["rows"][key]["held_out"] = value + 0.05  # the baseline was better than this run by 0.05
    baseline.write_text(json.dumps(saved))
    bad = run_cli("leaderboard", run_dir, "--check", baseline, "--tolerance", "0.02", "--format", "json")
    assert bad.exit_code == 1 and key in bad.output and "held-out" in bad.output
    assert run_cli("leaderboard", run_dir, "--check", baseline, "--tolerance", "0.06", "--format", "json").exit_code == 0
    saved["rows"]["tiny/pretrained/N=4/ties"] = {"held_in": 0.5, "held_out": 0.5}
    baseline.write_text(json.dumps(saved))
    missing = run_cli("leaderboard", run_dir, "--check", baseline, "--tolerance", "0.06", "--format", "json")
    assert missing.exit_code == 1 and "N=4/ties: missing" in missing.output


def test_html_uses_one_colour_per_method_on_every_chart(study):
    import re

    run_dir, _, _ = study
    page = run_cli("leaderboard", run_dir, "--format", "html").output
    legend = re.findall(r'stroke="(#[0-9a-f]{6})" stroke-width="2"/><text [^>]*class="l">([a-z_]+)</text>', page)
    seen: dict[str, set] = {}
    for colour, method in legend:
        seen.setdefault(method, set()).add(colour)
    assert set(seen) == {"average", "task_arithmetic", "ties"} and all(len(c) == 1 for c in seen.values())
    assert len({c for cs in seen.values() for c in cs}) == 3


def test_jobs_refuse_to_run_once_mergebench_source_changed(tmp_path):
    """A worker that would run other code than the runner started with stops with one clear message (seen
    for real: an edit under a running run made a worker call a function with another signature)."""
    from mergebench.core.errors import MergebenchError
    from mergebench.study import jobs

    now = jobs.source_fingerprint()
    assert now == jobs.source_fingerprint() and len(now) == 16
    try:
        jobs.expect_source("0" * 16)  # what the source was when the run started
        from mergebench.study.contracts import ComponentChoice, ModelRole

        job = jobs.EvalJob(str(tmp_path), tmp_path / "model", "micro-t0", None, ("micro_nli",),
                           ComponentChoice("lm-eval", {"batch_size": 8}), "test", ModelRole("base", 0, "tiny", "pretrained"))
        with pytest.raises(MergebenchError, match="source files changed while this run was going"):
            jobs.run_job(job)
        jobs.expect_source(now)
        jobs._check_source()  # unchanged source: no complaint
    finally:
        jobs.expect_source(None)
