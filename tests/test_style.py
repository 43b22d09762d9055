"""The code base stays ruff clean (the configuration lives in pyproject.toml) and its functions stay readable."""

import ast
import subprocess
import sys

from conftest import REPO

LONGEST_FUNCTION = 120  # lines; a longer one is several jobs that want names of their own


def test_ruff_clean() -> None:
    result = subprocess.run([sys.executable, "-m", "ruff", "check", str(REPO)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:]


def test_no_function_is_longer_than_the_limit() -> None:
    too_long = []
    for path in sorted([*(REPO / "twist_core").rglob("*.py"), *(REPO / "app").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > LONGEST_FUNCTION:
                    too_long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not too_long, "split these functions: " + ", ".join(too_long)
