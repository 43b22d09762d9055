"""The over-clustering head (``--overcluster``): trained beside the K-way head by the same loss, never exported."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import tiny_train_config
from test_train import ENV, train_command

from twist_core.deploy.export import ExportConfig, export_model
from twist_core.deploy.infer import OnnxModel
from twist_core.model.checkpoint import load_checkpoint, save_checkpoint
from twist_core.train.loop import train
from twist_core.train.options import TrainConfig


@pytest.fixture(scope="module")
def overcluster_run(shapes_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("overcluster")
    train(tiny_train_config(shapes_folder, out, classes=4, epochs=2, overcluster=12))
    return out


def test_the_head_trains_beside_the_k_way_head_and_shapes_the_shared_layers(overcluster_run: Path,
                                                                             shapes_folder: Path,
                                                                             tmp_path: Path) -> None:
    state = load_checkpoint(overcluster_run)
    assert state["config"]["overcluster"] == 12 == state["model_spec"]["overcluster"]
    assert state["model"]["overcluster.0.0.weight"].shape == (12, 64)
    logged = [json.loads(line) for line in (overcluster_run / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(row["overcluster"]) for row in logged)
    plain = tmp_path / "plain"
    train(tiny_train_config(shapes_folder, plain, classes=4, epochs=2))  # the default: none
    assert "overcluster" not in json.loads((plain / "metrics.jsonl").read_text().splitlines()[-1])
    assert not any(name.startswith("overcluster.") for name in load_checkpoint(plain)["model"])
    # same seed and data: only the over-clustering head's loss can make the shared layers differ
    assert not torch.allclose(load_checkpoint(plain)["model"]["head.mlp.0.weight"],
                              state["model"]["head.mlp.0.weight"])


def test_export_leaves_the_head_out_and_matches_pytorch(overcluster_run: Path, tmp_path: Path) -> None:
    model_path = export_model(ExportConfig(run=str(overcluster_run), out=str(tmp_path / "m.onnx")))
    graph = onnx.load(str(model_path))
    assert [output.name for output in graph.graph.output] == ["embedding", "probs"]
    assert not any("overcluster" in init.name for init in graph.graph.initializer)
    card = json.loads(model_path.with_suffix(".json").read_text())
    assert card["n_classes"] == 4 and card["outputs"] == ["embedding", "probs"]
    probs = OnnxModel(model_path).predict_arrays(np.random.default_rng(0).normal(size=(3, 3, 32, 32))
                                                 .astype(np.float32))[0]
    assert probs.shape == (3, 4)


def test_off_by_default_and_a_head_not_above_k_is_refused(shapes_folder: Path, tmp_path: Path) -> None:
    assert TrainConfig().overcluster == 0
    result = subprocess.run(train_command(shapes_folder, tmp_path / "bad", "--overcluster", "4"), env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--overcluster 4" in result.stderr
    assert result.stderr.strip().count("\n") == 0 and not (tmp_path / "bad").exists()


def test_a_run_saved_before_the_new_options_resumes_without_them(shapes_folder: Path, tmp_path: Path) -> None:
    """An older run's config has no neighbour options: it resumes as it ran, not with today's auto."""
    out = tmp_path / "old"
    train(tiny_train_config(shapes_folder, out, epochs=1, neighbour_fraction=0.0))
    checkpoint = load_checkpoint(out)
    for name in ("overcluster", "neighbour_fraction", "neighbour_k", "neighbour_share", "neighbour_every"):
        checkpoint["config"].pop(name)
    for name in ("neighbours", "neighbours_epoch", "paired_epoch"):
        checkpoint.pop(name)
    checkpoint["model_spec"].pop("overcluster")
    checkpoint["config"]["epochs"], checkpoint["total_steps"] = 2, 2 * checkpoint["steps_per_epoch"]  # one to go
    save_checkpoint(out / "last.pt", checkpoint)
    train(dataclasses.replace(tiny_train_config(shapes_folder, out), resume=True))
    resumed = load_checkpoint(out)
    assert resumed["epoch"] == 2
    assert resumed["config"]["overcluster"] == 0 and resumed["config"]["neighbour_fraction"] == 0.0
