"""`mergebench demo`, the README's first command until `mergebench run` exists."""

from __future__ import annotations

from click.testing import CliRunner

from mergebench.cli.main import cli
from mergebench.demo import TASKS, run_demo


def test_demo_experts_specialise_and_averaging_recovers_both(tmp_path):
    scores = run_demo(tmp_path / "demo", steps=30, seed=0)
    first, second = TASKS
    assert scores["base"][first] < 0.2 and scores["base"][second] < 0.2
    assert scores[f"expert: {first}"][first] > 0.95 and scores[f"expert: {first}"][second] < 0.3
    assert scores[f"expert: {second}"][second] > 0.95 and scores[f"expert: {second}"][first] < 0.3
    assert min(scores["merged: average"].values()) > 0.9
    assert min(scores["merged: task_arithmetic"].values()) > 0.9
    # every registered method but those that learn from calibration data, each with the experts it takes
    from mergebench.core.plugin_manager import get_plugin_manager

    merged = {k.split()[1] for k in scores if k.startswith("merged:")}
    assert merged == {m.name for m in get_plugin_manager().merge_methods() if m.calibration is None}
    assert "merged: slerp (1 of 2 experts)" in scores


def test_demo_command_runs(tmp_path):
    result = CliRunner().invoke(cli, ["demo", "--dir", str(tmp_path / "d"), "--steps", "5"])
    assert result.exit_code == 0, result.output
    assert "merged: ties" in result.output and (tmp_path / "d" / "merged-ties" / "README.md").is_file()
