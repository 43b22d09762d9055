"""A broken plugin never stops ``twist`` (issue 36, item 12): a package of the ``twist.commands`` entry-point group
whose module raises anything at import (not only ImportError; SystemExit too) is skipped with one warning line
naming it and the error (its control characters escaped), and every other command, the app's included, still
runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

BROKEN = {  # entry-point name: (module source, what the warning names)
    "boom": ("raise RuntimeError('plugin exploded at import')\n", "RuntimeError: plugin exploded at import"),
    "typo": ("def broken(:\n    pass\n", "SyntaxError"),
    "picky": ("raise ValueError('first line\\nsecond line')\n", "ValueError: first line second line"),
    "quits": ("import sys\nsys.exit(3)\n", "SystemExit: 3"),  # BaseException, not Exception
    "paints": ("raise RuntimeError('\\x1b]0;owned\\x07\\x1b[31mred\\u202e')\n",
               "RuntimeError: \\x1b]0;owned\\x07\\x1b[31mred\\u202e"),  # shown escaped, never sent to the terminal
}


@pytest.fixture(scope="module")
def plugins(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A really installed (if broken) distribution: modules plus a dist-info whose entry_points.txt registers them."""
    folder = tmp_path_factory.mktemp("plugins")
    for name, (source, _) in BROKEN.items():
        (folder / f"twist_plugin_{name}.py").write_text(source)
    info = folder / "twist_broken_plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: twist-broken-plugins\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[twist.commands]\n" + "".join(
        f"{name} = twist_plugin_{name}:COMMAND\n" for name in BROKEN))
    return folder


def twist(plugins: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "twist_core.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{plugins}"})


@pytest.mark.parametrize("args", [("--help",), ("app", "--help"), ("import-labels", "--help")])
def test_a_plugin_that_raises_at_import_is_skipped_with_one_warning(plugins: Path, args: tuple[str, ...]) -> None:
    result = twist(plugins, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and not any(c in result.stderr for c in "\x1b\x07\u202e"), result.stderr
    warnings = result.stderr.splitlines()
    assert len(warnings) == len(BROKEN), result.stderr
    for name, (_, named) in BROKEN.items():
        line = next(line for line in warnings if f"'{name}'" in line)
        assert line.startswith("twist: warning: command") and named in line, line
    if args == ("--help",):
        assert "import-labels" in result.stdout and "app" in result.stdout and "boom" not in result.stdout
    else:
        assert result.stdout.startswith(f"usage: twist {args[0]}"), result.stdout[:300]
