"""The code base stays ruff clean (the configuration lives in pyproject.toml)."""

import subprocess
import sys

from conftest import REPO


def test_ruff_clean() -> None:
    result = subprocess.run([sys.executable, "-m", "ruff", "check", str(REPO)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:]
