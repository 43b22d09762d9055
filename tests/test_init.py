"""`--init`: torchvision state dicts, reference checkpoints and torchvision:NAME load completely or stop clearly."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import REPO

from twist_core.config import AUTO
from twist_core.io_utils import file_sha256
from twist_core.model.init_weights import InitError, load_into, read_init
from twist_core.model.network import ModelSpec, TwistModel
from twist_core.train.options import TrainConfig, follow_init

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
REFERENCE_HEAD = {"mlp.0.": "projection_heads.projection_head.0.", "mlp.1.": "projection_heads.projection_head.1.",
                  "mlp.3.": "projection_heads.projection_head.4.", "mlp.4.": "projection_heads.projection_head.5.",
                  "mlp.6.": "projection_heads.last_linear.", "logit_norm.": "projection_heads.norm."}


def random_state(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The module's state with every float tensor replaced by seeded noise, so a load is visible in each tensor."""
    generator = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=generator) if v.is_floating_point() else v.clone())
            for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def torchvision_resnet18(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tv") / "resnet18.pth"
    torch.save(random_state(torchvision.models.resnet18(), 1), path)
    return path


def reference_checkpoint(path: Path, n_classes: int, hidden: int = 64) -> dict[str, torch.Tensor]:
    """The reference's training checkpoint layout: model (backbone.* + projection_heads.*), backbone, args, ..."""
    backbone = random_state(torchvision.models.resnet18(), 2)
    backbone = {k: v for k, v in backbone.items() if not k.startswith("fc.")}  # its fc is an Identity
    ours = random_state(TwistModel(ModelSpec("resnet18", 64, False, hidden, n_classes)).head, 3)
    model = {f"backbone.{k}": v for k, v in backbone.items()}
    for key, value in ours.items():
        prefix = next(p for p in REFERENCE_HEAD if key.startswith(p))
        model[REFERENCE_HEAD[prefix] + key[len(prefix):]] = value
    args = argparse.Namespace(backbone="resnet18", lr=0.5, dim=n_classes, hid_dim=hidden, aug="multicrop",
                              global_crops_scale=(0.4, 1.0), output_dir="out", gpu=0, distributed=True)
    torch.save({"model": model, "backbone": backbone, "optimizer": {"state": {}, "param_groups": []}, "epoch": 849,
                "args": args, "scaler": {"scale": 1024.0}}, path)
    return {**{f"backbone.{k}": v for k, v in backbone.items()}, **{f"head.{k}": v for k, v in ours.items()}}


def model_for(source: Path | str, classes: int, **options) -> tuple[TwistModel, bool, TrainConfig]:
    init = read_init(str(source))
    config = follow_init(TrainConfig(data="x", init=str(source), classes=classes, **options), init)
    hidden_dim = 2048 if config.hidden_dim == AUTO else config.hidden_dim  # what resolve_auto picks for a ResNet
    spec = ModelSpec(config.backbone, config.width, bool(config.small_stem), hidden_dim, classes)
    model = TwistModel(spec)
    return model, load_into(model, init), config


def assert_every_tensor(model: TwistModel, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def test_torchvision_state_dict_loads_completely_at_its_own_width(torchvision_resnet18: Path) -> None:
    model, head_loaded, config = model_for(torchvision_resnet18, 10)
    assert (config.backbone, config.width, config.small_stem) == ("resnet18", 64, False)
    saved = torch.load(torchvision_resnet18, weights_only=True)
    assert_every_tensor(model, {f"backbone.{k}": v for k, v in saved.items() if not k.startswith("fc.")})
    assert not head_loaded and config.init_sha256 == file_sha256(torchvision_resnet18)


def test_reference_full_checkpoint_loads_backbone_and_head_when_k_matches(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pth"
    expected = reference_checkpoint(path, n_classes=7)
    model, head_loaded, config = model_for(path, 7)
    assert head_loaded and config.hidden_dim == 64
    assert_every_tensor(model, expected)
    other_k, head_loaded, _ = model_for(path, 5)
    assert not head_loaded
    assert_every_tensor(other_k, {k: v for k, v in expected.items() if k.startswith("backbone.")})


def test_backbone_only_file_with_prefixes_and_no_counters(tmp_path: Path) -> None:
    backbone = {k: v for k, v in random_state(torchvision.models.resnet18(), 4).items()
                if not k.startswith("fc.") and v.ndim > 0}  # 0-d num_batches_tracked left out: still complete
    path = tmp_path / "backbone.pth"
    torch.save({f"module.backbone.{k}": v for k, v in backbone.items()}, path)
    model, _, _ = model_for(path, 3)
    assert_every_tensor(model, {f"backbone.{k}": v for k, v in backbone.items()})


def test_partial_match_stops_naming_what_did_not_fit(torchvision_resnet18: Path, tmp_path: Path) -> None:
    saved = torch.load(torchvision_resnet18, weights_only=True)
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in saved.items() if not k.startswith("layer4.")}, partial)
    with pytest.raises(InitError, match=r"missing layer4\.0\.conv1\.weight"):
        model_for(partial, 4)
    with pytest.raises(InitError, match=r"conv1\.weight \(64, 3, 7, 7\) vs \(64, 3, 3, 3\)"):
        model_for(torchvision_resnet18, 4, small_stem=True)


def test_a_pickle_with_other_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "x": Path("/")}, path)
    with pytest.raises(InitError, match="objects other than tensors") as error:
        read_init(str(path))
    assert "weights_only" not in str(error.value)


def test_torchvision_name_offline_names_the_file_to_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    began = time.monotonic()
    try:
        read_init("torchvision:resnet18")
    except InitError as error:  # offline, as CI and this machine are
        assert str(expected) in str(error) and "download.pytorch.org" in str(error)
        assert time.monotonic() - began < 15
    else:
        pytest.skip("this machine is online: the weights were downloaded instead")


def test_torchvision_name_loads_from_a_prefilled_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    state = random_state(torchvision.models.resnet18(), 5)
    torch.save(state, cached)
    model, _, config = model_for("torchvision:resnet18", 10)
    assert config.init_sha256 == file_sha256(cached)
    assert_every_tensor(model, {f"backbone.{k}": v for k, v in state.items() if not k.startswith("fc.")})


def run_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "twist_core.cli", "train", *args], env=ENV, capture_output=True,
                          text=True, timeout=600)


def test_init_run_on_a_cpu_follows_the_weights_and_records_them(shapes_folder: Path, torchvision_resnet18: Path,
                                                               tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run_train(str(shapes_folder), "--out", str(out), "--init", str(torchvision_resnet18), "--classes", "2",
                       "--epochs", "1", "--batch-size", "16", "--hidden-dim", "32", "--workers", "0",
                       "--no-progress", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    saved = json.loads((out / "config.json").read_text())
    assert (saved["backbone"], saved["width"], saved["small_stem"]) == ("resnet18", 64, False)
    assert saved["init"] == str(torchvision_resnet18) and saved["init_sha256"] == file_sha256(torchvision_resnet18)
    assert "--init: " in result.stderr
    from twist_core.deploy.export import ExportConfig, export_model

    card = json.loads(export_model(ExportConfig(run=str(out), out=str(tmp_path / "m.onnx"))).with_suffix(".json")
                      .read_text())
    assert (card["init"], card["init_sha256"]) == (saved["init"], saved["init_sha256"])
    assert "pooled feature" in card["embedding"]


def test_init_that_does_not_fit_is_one_line_exit_2_and_writes_nothing(shapes_folder: Path, tmp_path: Path) -> None:
    weights = tmp_path / "r18.pth"
    state = torchvision.models.resnet18().state_dict()
    torch.save({k: v for k, v in state.items() if not k.startswith("layer4.")}, weights)
    out = tmp_path / "run"
    result = run_train(str(shapes_folder), "--out", str(out), "--init", str(weights), "--no-progress")
    assert result.returncode == 2 and "layer4" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (out / "config.json").exists()
