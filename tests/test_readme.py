"""The README's two commands are what CI and users run."""

from conftest import REPO


def readme_commands() -> list[str]:
    lines = (REPO / "README.md").read_text().splitlines()
    return [line for line in lines if line.startswith("python3 -m venv .venv")]


def test_ci_runs_exactly_the_readme_test_command():
    main_job, tests = readme_commands()[:2]
    assert main_job.endswith("mergebench run") and "torch==2.13.0" in main_job and "[eval]" in main_job
    assert "pytest" in tests and "torch==2.13.0" in tests
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert tests in ci
    # the mergekit reference's virtualenv, built the same way by users and CI
    reference = [line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("python3 -m venv .mergekit-venv")]
    assert len(reference) == 1 and "mergekit==0.1.5" in reference[0] and reference[0] in ci
