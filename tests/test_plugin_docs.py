"""docs/plugins.md documents every hook, and every example on it runs."""

from __future__ import annotations

import re

import pytest

from mergebench.core import hookspecs

from conftest import REPO

PAGE = (REPO / "docs" / "plugins.md").read_text()
HOOKS = sorted(name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "mergebench_spec"))


def sections() -> dict[str, str]:
    parts = re.split(r"^### (\w+)\s*$", PAGE, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_the_hooks_are_found():
    assert {"register_merge_methods", "register_evaluators", "register_executors", "register_commands"} <= set(HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_section_with_a_runnable_example(hook):
    body = sections().get(hook)
    assert body is not None, f"docs/plugins.md has no '### {hook}' section"
    assert f"`{hook}(" in body, "the section states the hook's signature"
    blocks = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    assert blocks, f"the {hook} section has no example"
    for code in blocks:
        exec(compile(code, f"docs/plugins.md#{hook}", "exec"), {"__name__": f"docs_{hook}"})
