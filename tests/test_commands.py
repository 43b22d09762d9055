"""Every command is built the same way: ``--config FILE`` is honoured, flags override it, and a known error
is one line ``twist CMD: error: ...`` with exit code 2, whichever command it comes from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from twist_core.cli import COMMANDS
from twist_core.cli import main as twist

DEMO_MODEL = REPO / "models" / "demo" / "model.onnx"


def config_cases(tmp_path: Path) -> dict[str, tuple[list[str], dict, str]]:
    """Per command: the command line, a config file's options (one of them wrong) and what the error names."""
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder\n")
    missing = str(tmp_path / "missing")
    return {
        "demo": ([], {"workspace": str(a_file / "ws"), "app": False}, "a-file"),
        "train": ([str(tmp_path)], {"time-budget": "banana"}, "--time-budget"),
        "eval": ([], {"source": missing, "data": str(tmp_path)}, missing),
        "export": ([], {"run": missing, "out": str(tmp_path / "m.onnx")}, missing),
        "label": ([str(DEMO_MODEL), str(tmp_path)], {"topk": 0}, "topk"),
        "index": ([], {"source": missing + ".csv"}, missing),
        "search": ([], {"index": missing, "id": 1}, missing),
        "duplicates": ([str(tmp_path)], {"threshold": 2.0}, "--threshold"),
        "app": ([], {"model": missing + ".onnx", "index": str(tmp_path)}, missing),
        "import-labels": ([missing + ".json"], {"index": str(tmp_path)}, missing),
    }


def test_every_command_is_covered(tmp_path: Path) -> None:
    assert set(config_cases(tmp_path)) == set(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_config_file_is_honoured(command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The wrong value comes only from the file, so its one-line error proves the file was read (search and
    duplicates had no --config before: argparse refused the flag with a usage message)."""
    args, options, named = config_cases(tmp_path)[command]
    config = tmp_path / ("options.yaml" if len(command) % 2 else "options.json")
    config.write_text(yaml.safe_dump(options) if config.suffix == ".yaml" else json.dumps(options))
    assert twist([command, *args, "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"twist {command}: error: ") and err.count("\n") == 1, err
    assert named in err


def test_flags_override_the_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "options.yaml"
    config.write_text(yaml.safe_dump({"threshold": 0.5}))
    assert twist(["duplicates", str(tmp_path / "missing"), "--config", str(config), "--threshold", "3"]) == 2
    assert "got 3.0" in capsys.readouterr().err


def test_unknown_or_unreadable_config_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "typo.yaml").write_text("treshold: 0.5\n")
    (tmp_path / "broken.yaml").write_text("threshold: [0.5\n")
    for name, named in (("typo.yaml", "treshold"), ("broken.yaml", "broken.yaml"), ("none.yaml", "none.yaml")):
        assert twist(["duplicates", str(tmp_path), "--config", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("twist duplicates: error: ") and err.count("\n") == 1 and named in err, err
