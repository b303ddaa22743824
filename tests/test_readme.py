"""The README's two commands are what CI and users run."""

from conftest import REPO


def readme_commands() -> list[str]:
    lines = (REPO / "README.md").read_text().splitlines()
    return [line for line in lines if line.startswith("python3 -m venv .venv")]


def test_ci_runs_exactly_the_readme_test_command():
    main_job, tests = readme_commands()[:2]
    assert main_job.endswith("mergebench run") and "torch==2.13.0" in main_job and "[eval]" in main_job
    assert "pytest" in tests and "torch==2.13.0" in tests
    assert tests in (REPO / ".ci" / "run").read_text().splitlines()
