"""A hostile or unlucky user against `twist train`: kill -9 at epoch boundaries, bad options, broken checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import REPO

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
EPOCHS = 3


def command(data: Path, out: Path, *extra: str) -> list[str]:
    """A run of a few seconds whose only checkpoints are the epoch ones: the boundary is where kills hurt."""
    return [sys.executable, "-m", "twist_core.cli", "train", str(data), "--out", str(out), "--classes", "4",
            "--width", "8", "--hidden-dim", "512", "--image-size", "32", "--epochs", str(EPOCHS), "--batch-size",
            "8", "--workers", "0", "--no-progress", "--checkpoint-every", "0", "--self-label-fraction", "0.3",
            *extra]


def metric_lines(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def checkpoint_temp_exists(out: Path) -> bool:
    return out.exists() and any(name.startswith(".last.pt.") for name in os.listdir(out))


def kill_when(process: subprocess.Popen, moment: Callable[[], bool], still_there: Callable[[], bool]) -> bool:
    """SIGSTOP the run as soon as ``moment`` holds; SIGKILL it if ``still_there`` confirms the moment, else go on.

    Stopping first makes the kill land exactly inside a short window (a temporary file exists for milliseconds).
    Returns whether the moment was hit before the run ended.
    """
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if moment():
            process.send_signal(signal.SIGSTOP)
            if still_there():
                process.kill()
                process.wait()
                return True
            process.send_signal(signal.SIGCONT)
    process.wait()
    return False


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory: pytest.TempPathFactory, shapes_folder: Path) -> Path:
    out = tmp_path_factory.mktemp("straight")
    subprocess.run(command(shapes_folder, out), env=ENV, check=True, capture_output=True, timeout=600)
    return out


MOMENTS: dict[str, tuple[Callable[[Path], bool], Callable[[Path], bool]]] = {
    # The first epoch's checkpoint is being written: no last.pt yet.
    "first_checkpoint_temp_file": (checkpoint_temp_exists, checkpoint_temp_exists),
    # A later checkpoint is being written: last.pt of the epoch before is there.
    "later_checkpoint_temp_file": (lambda out: (out / "last.pt").exists() and checkpoint_temp_exists(out),
                                   checkpoint_temp_exists),
    # The first epoch's metrics line has just appeared (it used to be written before the checkpoint).
    "first_metrics_line": (lambda out: len(metric_lines(out)) >= 1, lambda out: True),
    # Mid-run, right after the last checkpoint of an epoch appeared.
    "after_checkpoint": (lambda out: (out / "last.pt").exists(), lambda out: True),
}


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_kill_at_an_epoch_boundary_then_continue_equals_straight_run(straight_run: Path, shapes_folder: Path,
                                                                      tmp_path: Path, moment: str) -> None:
    out = tmp_path / "run"
    reached, confirmed = MOMENTS[moment]
    process = subprocess.Popen(command(shapes_folder, out), env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    assert kill_when(process, lambda: reached(out), lambda: confirmed(out)), f"the run ended before {moment}"
    assert not (out / "DONE").exists()
    has_checkpoint = (out / "last.pt").exists()
    if has_checkpoint:  # whatever was written after the checkpoint must not run ahead of it
        assert len(metric_lines(out)) <= torch.load(out / "last.pt", weights_only=True)["epoch"]
    # What a user does next: --resume if there is a checkpoint, else simply start again.
    again = subprocess.run(command(shapes_folder, out, *(["--resume"] if has_checkpoint else [])), env=ENV,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert [row["epoch"] for row in metric_lines(out)] == list(range(1, EPOCHS + 1))
    first = torch.load(straight_run / "last.pt", weights_only=True)["model"]
    second = torch.load(out / "last.pt", weights_only=True)["model"]
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name


def run_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "twist_core.cli", "train", *args], env=ENV, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("options, words", [
    (["--time-budget", "garbage"], "--time-budget"),
    (["--time-budget", "0s"], "--time-budget"),
    (["--classes", "0"], "--classes 0"),
    (["--classes", "-3"], "--classes -3"),
])
def test_bad_options_are_one_line_and_exit_2(shapes_folder: Path, tmp_path: Path, options: list[str],
                                            words: str) -> None:
    out = tmp_path / "run"
    result = run_train(str(shapes_folder), "--out", str(out), "--no-progress", *options)
    assert result.returncode == 2, result.stderr
    assert words in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists()  # nothing half-written


@pytest.mark.parametrize("classes, words", [("1", "--classes 1"), ("60", "more than the 48 readable images")])
def test_odd_class_counts_warn_but_train(shapes_folder: Path, tmp_path: Path, classes: str, words: str) -> None:
    result = run_train(*command(shapes_folder, tmp_path / "run")[4:], "--classes", classes, "--epochs", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"warning: {words}" in result.stderr or words in result.stderr


@pytest.mark.parametrize("content", [b"", b"garbage, not a checkpoint", "truncated"])
def test_broken_checkpoint_is_one_line_and_exit_2(straight_run: Path, shapes_folder: Path, tmp_path: Path,
                                                  content: bytes | str) -> None:
    out = tmp_path / "run"
    out.mkdir()
    whole = (straight_run / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(whole[: len(whole) // 2] if content == "truncated" else content)
    (out / "config.json").write_text((straight_run / "config.json").read_text())
    before = (out / "last.pt").read_bytes()
    result = run_train(*command(shapes_folder, out, "--resume")[4:])
    assert result.returncode == 2, result.stderr[-2000:]
    assert "last.pt" in result.stderr and "Traceback" not in result.stderr
    assert "weights_only=False" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert (out / "last.pt").read_bytes() == before


def test_a_pickle_that_runs_code_is_refused_without_unsafe_advice(shapes_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"config": {}, "model": {}, "epoch": 0, "global_step": 0, "history": [], "x": Path("/")},
               out / "last.pt")
    result = run_train(*command(shapes_folder, out, "--resume")[4:])
    assert result.returncode == 2 and "weights_only" not in result.stderr and "Traceback" not in result.stderr


def test_a_run_folder_is_marked_as_output(straight_run: Path) -> None:
    from twist_core.io_utils import OUTPUT_MARKER

    assert (straight_run / OUTPUT_MARKER).exists()
