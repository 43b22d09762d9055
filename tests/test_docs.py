"""README's commands stay true: .ci/run runs exactly README's test command, and the Dockerfile is linted."""

from __future__ import annotations

import re

from conftest import REPO


def readme_commands() -> list[str]:
    blocks = re.findall(r"```\n(.*?)\n```", (REPO / "README.md").read_text(), flags=re.S)
    return [block.strip() for block in blocks[:2]]


def test_readme_has_main_and_test_commands_and_ci_runs_the_test_command() -> None:
    main_command, test_command = readme_commands()
    assert main_command == "pip install -e . && twist demo"
    assert "pytest" in test_command
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines
