"""The README's commands and examples are the ones that work."""
from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)\n```", README, re.S)


def test_ci_runs_exactly_the_readme_test_command():
    test_command = _blocks("bash")[1]
    assert "pytest" in test_command
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_python_examples_run():
    for block in _blocks("python"):
        exec(compile(block, "README.md", "exec"), {})
