"""``--config`` values are checked against the option types (issue 36, item 11): a wrong type is one line that
names the key, the value and the type expected, exit code 2, before the command does anything (the app before
it serves). Strict: no text is read as a number or a switch (``overwrite: "false"`` rewrote a finished table)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, free_port

DEMO_MODEL = REPO / "models" / "demo" / "model.onnx"

BAD = {  # case: (command, the file's options, the text the error names besides the key)
    "merges-to-text": ("suggest-merges", {"to": "5"}, '"5"'),
    "merges-to-switch": ("suggest-merges", {"to": True}, "true"),
    "merges-top-text": ("suggest-merges", {"top": "x"}, '"x"'),
    "merges-state-dir-number": ("suggest-merges", {"state_dir": 5}, "5"),
    "merges-measure-not-a-choice": ("suggest-merges", {"measure": "cosine"}, '"cosine"'),
    "merges-key-not-text": ("suggest-merges", {5: "x"}, "option names are text"),
    "label-overwrite-quoted": ("label", {"overwrite": "false"}, '"false"'),
    "label-overwrite-number": ("label", {"overwrite": 1}, "1"),
    "label-topk-decimal": ("label", {"topk": 2.5}, "2.5"),
    "app-port-text": ("app", {"port": "17862"}, '"17862"'),
    "app-max-upload-decimal": ("app", {"max_upload_mb": 1.5}, "1.5"),
    "app-state-dir-number": ("app", {"state_dir": 5}, "5"),
    "train-classes-text": ("train", {"classes": "4"}, '"4"'),
    "train-lr-text": ("train", {"lr": "fast"}, '"fast"'),  # an auto option: auto or a number
    "train-compile-text": ("train", {"compile": "no"}, '"no"'),
    "train-epochs-list": ("train", {"epochs": [1, 2]}, "[1, 2]"),
    "import-labels-dry-run-text": ("import-labels", {"dry_run": "yes"}, '"yes"'),
}


def command_line(command: str, bundle: dict[str, Path], folder: Path, table: Path) -> list[str]:
    """Arguments that are right in every other way, so only the file's value can be the mistake."""
    return {
        "suggest-merges": [str(bundle["index"]), "--measure", "modularity", "--bootstrap", "0"],
        "label": [str(DEMO_MODEL), str(folder), "--out", str(table), "--workers", "0", "--no-progress"],
        "app": ["--model", str(bundle["model"]), "--index", str(bundle["index"]), "--port", str(free_port()),
                "--state-dir", str(table.parent / "state")],
        "train": [str(folder), "--out", str(table.parent / "run"), "--classes", "4", "--width", "8", "--epochs",
                  "1", "--image-size", "32", "--workers", "0", "--no-progress"],
        "import-labels": [str(table.parent / "tasks.json"), "--index", str(bundle["index"]), "--state-dir",
                          str(table.parent / "state")],
    }[command]


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_config_value_of_the_wrong_type_is_one_line_and_exit_2(case: str, app_bundle: dict[str, Path],
                                                                   shapes_folder: Path, tmp_path: Path) -> None:
    command, options, shown = BAD[case]
    table = tmp_path / "labels.csv"
    table.write_text("path,cluster\nfinished.png,0\n")  # a finished table: only --overwrite may replace it
    (tmp_path / "tasks.json").write_text("[]\n")
    as_json = len(case) % 2 and all(isinstance(key, str) for key in options)  # JSON keys are always text
    config = tmp_path / ("options.json" if as_json else "options.yaml")
    config.write_text(json.dumps(options) if as_json else yaml.safe_dump(options))
    try:
        result = subprocess.run([sys.executable, "-m", "twist_core.cli", command,
                                 *command_line(command, app_bundle, shapes_folder, table), "--config", str(config)],
                                cwd=REPO, capture_output=True, text=True, timeout=90,
                                env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    except subprocess.TimeoutExpired:
        pytest.fail(f"twist {command} went on with {options} (the app served) instead of refusing it")
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:], result.stdout[-500:])
    error = result.stderr
    assert error.startswith(f"twist {command}: error: ") and error.count("\n") == 1, error[-2000:]
    key = next(iter(options))
    assert (str(key) in error or key == 5) and shown in error and "Traceback" not in error, error
    assert table.read_text() == "path,cluster\nfinished.png,0\n"
    assert not (tmp_path / "run").exists() and not (tmp_path / "state").exists()


def test_right_types_still_load(tmp_path: Path) -> None:
    """What the check accepts: an integer for a number, null for an option that may be left out, auto (and the
    old sentinels) for auto options, true/false for switches; a run's saved config.json is covered by
    tests/test_commands.py::test_saved_config_reproduces_an_auto_run."""
    from twist_core.commands.suggest_merges import build_parser
    from twist_core.config import AUTO, build_config
    from twist_core.curate.merges import MergesConfig
    from twist_core.train.options import TrainConfig

    config = tmp_path / "ok.yaml"
    config.write_text("to: null\ntop: 3\nmeasure: heads\nplot: tree.png\n")
    args = build_parser().parse_args(["ix", "--config", str(config)])
    merges = build_config(MergesConfig, args, args.config)
    assert (merges.to, merges.top, merges.measure, merges.plot, merges.source) == (None, 3, "heads", "tree.png", "ix")
    from twist_core.commands.train import build_parser as train_parser

    config.write_text("lr: 1\nworkers: auto\nweight_decay: null\ncompile: false\nwarmup_epochs: 2\n")
    args = train_parser().parse_args(["data", "--config", str(config)])
    train = build_config(TrainConfig, args, args.config)
    assert (train.lr, train.workers, train.weight_decay, train.compile) == (1.0, AUTO, AUTO, False)
    assert isinstance(train.lr, float) and isinstance(train.warmup_epochs, float)


@pytest.mark.parametrize("given", ["flag", "config"])
@pytest.mark.parametrize("k", [-1, 0])
def test_a_count_below_one_is_a_range_error_not_an_empty_answer(given: str, k: int, app_bundle: dict[str, Path],
                                                                tmp_path: Path) -> None:
    """``k: -1`` answered "no images found: the index holds no comparable vectors there" (exit 1), which blames
    the index for the option's mistake."""
    config = tmp_path / "k.yaml"
    config.write_text(yaml.safe_dump({"k": k}))
    option = ["-k", str(k)] if given == "flag" else ["--config", str(config)]
    result = subprocess.run([sys.executable, "-m", "twist_core.cli", "search", str(app_bundle["index"]), "--id", "0",
                             *option], cwd=REPO, capture_output=True, text=True, timeout=90)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, (result.returncode, result.stderr[-2000:])
    assert result.stderr.startswith("twist search: error: k ") and f"at least 1, got {k}" in result.stderr


def test_an_id_past_the_index_range_is_an_unknown_id(app_bundle: dict[str, Path]) -> None:
    """``--id 99999999999999999999`` overflowed FAISS's id type: a traceback."""
    result = subprocess.run([sys.executable, "-m", "twist_core.cli", "search", str(app_bundle["index"]), "--id",
                             str(10**20)], cwd=REPO, capture_output=True, text=True, timeout=90)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, (result.returncode, result.stderr[-2000:])
    assert f"no image with id {10**20}" in result.stderr
