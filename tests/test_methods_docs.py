"""README.md and docs/methods.md list every built-in merge method with its reference, as the registry has it."""

import re

from click.testing import CliRunner
from conftest import REPO

from mergebench.cli.main import cli

START, END = "<!-- methods:start -->", "<!-- methods:end -->"


def _table(monkeypatch) -> str:
    monkeypatch.setenv("MERGEBENCH_LOAD_PLUGINS", "")  # built-ins only
    result = CliRunner().invoke(cli, ["methods", "--markdown"])
    assert result.exit_code == 0, result.output
    return result.output


def _block(text: str) -> str:
    m = re.search(re.escape(START) + r"\n(.*?)" + re.escape(END), text, re.DOTALL)
    assert m, f"no {START} ... {END} block"
    return m.group(1)


def test_readme_and_docs_list_every_method_as_registered(monkeypatch):
    table = _table(monkeypatch)
    for page in ("README.md", "docs/methods.md"):
        assert _block((REPO / page).read_text()) == table, (
            f"{page} is out of date: regenerate it with `mergebench methods --markdown`")


def test_every_method_row_has_a_reference(monkeypatch):
    rows = [line for line in _table(monkeypatch).splitlines()[2:]]
    assert len(rows) >= 20
    assert all(not line.rstrip().endswith("| - |") for line in rows), "a method without a reference"
