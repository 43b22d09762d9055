"""Mistakes that used to end in a traceback: each is one line naming the problem, exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO


def twist(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "twist_core.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_label_on_a_gpu_that_is_not_there(shapes_folder: Path, tmp_path: Path) -> None:
    result = twist("label", str(REPO / "models" / "demo" / "model.onnx"), str(shapes_folder), "--out",
                   str(tmp_path / "labels.csv"), "--device", "cuda", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("twist label: error:") and "cuda" in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "labels.csv").exists()


def test_resume_without_a_run(tmp_path: Path) -> None:
    result = twist("train", "--resume", "--out", str(tmp_path / "no-run"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "no run in" in result.stderr and "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def test_every_label_user_error_exits_2(shapes_folder: Path, tmp_path: Path) -> None:
    """A missing model, an empty folder, a finished table in the way: one line and exit code 2, as the newer
    refusals (a GPU that is not there, a model giving NaN) already were."""
    model = REPO / "models" / "demo" / "model.onnx"
    (tmp_path / "empty").mkdir()
    (tmp_path / "done.csv").write_text("path\n")
    for args in ((str(tmp_path / "missing.onnx"), str(shapes_folder)), (str(model), str(tmp_path / "empty")),
                 (str(model), str(shapes_folder), "--out", str(tmp_path / "done.csv")),
                 (str(model), str(shapes_folder), "--topk", "0")):
        result = twist("label", *args, cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith("twist label: error:") and result.stderr.count("\n") == 1, result.stderr
        assert "Traceback" not in result.stderr
