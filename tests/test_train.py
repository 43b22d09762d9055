"""Training runs end to end, resumes exactly after any interruption, and fails clearly on a NaN loss."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_train_config

from twist_core.commands.train import build_parser
from twist_core.train.loop import train
from twist_core.train.options import TrainConfig

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def train_command(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "twist_core.cli", "train", str(data), "--out", str(out), "--classes", "4",
            "--width", "8", "--hidden-dim", "32", "--image-size", "32", "--epochs", "2", "--batch-size", "4",
            "--workers", "0", "--no-progress", "--checkpoint-every", "1", "--self-label-fraction", "0.5", *extra]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "last.pt", weights_only=True)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = weights(a), weights(b)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def interrupt_during_second_epoch(data: Path, out: Path, sig: int, *extra: str) -> subprocess.CompletedProcess:
    """Start a run and send ``sig`` as soon as epoch 1 is logged, i.e. somewhere inside epoch 2."""
    process = subprocess.Popen(train_command(data, out, *extra), env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 1:
            process.send_signal(sig)
            break
        time.sleep(0.005)
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory: pytest.TempPathFactory, shapes_folder: Path) -> Path:
    out = tmp_path_factory.mktemp("straight")
    subprocess.run(train_command(shapes_folder, out), env=ENV, check=True, capture_output=True, timeout=600)
    return out


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_interrupted_and_resumed_run_equals_straight_run(straight_run: Path, shapes_folder: Path, tmp_path: Path,
                                                         sig: int) -> None:
    out = tmp_path / "interrupted"
    result = interrupt_during_second_epoch(shapes_folder, out, sig)
    assert not (out / "DONE").exists(), "the run finished before it could be interrupted"
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    assert checkpoint["global_step"] >= 1  # a kill can land before epoch 1's own checkpoint is renamed in
    if sig == signal.SIGTERM:
        assert result.returncode == 128 + signal.SIGTERM
        assert "checkpoint saved" in result.stderr and "--resume" in result.stderr
        assert checkpoint["epoch"] == 1 and checkpoint["step_in_epoch"] >= 1  # saved mid-epoch, at the signal
    resumed = subprocess.run(train_command(shapes_folder, out, "--resume"), env=ENV, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (out / "DONE").exists()
    assert_same_weights(straight_run, out)
    resumed_config, straight_config = (json.loads((run / "config.json").read_text()) for run in (out, straight_run))
    for key in ("out", "resume"):
        resumed_config.pop(key), straight_config.pop(key)
    assert resumed_config == straight_config


def test_nan_loss_stops_with_message_and_keeps_checkpoint(straight_run: Path, shapes_folder: Path,
                                                          tmp_path: Path) -> None:
    out = tmp_path / "nan"
    result = interrupt_during_second_epoch(shapes_folder, out, signal.SIGTERM)
    assert result.returncode == 128 + signal.SIGTERM
    state = torch.load(out / "last.pt", weights_only=True)
    state["model"]["head.mlp.0.weight"].fill_(float("nan"))  # weights gone bad: the next loss is NaN
    torch.save(state, out / "last.pt")
    before = (out / "last.pt").read_bytes()
    result = subprocess.run(train_command(shapes_folder, out, "--resume"), env=ENV, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 1
    assert "the loss became nan" in result.stderr and "Traceback" not in result.stderr
    assert (out / "last.pt").read_bytes() == before


def test_a_new_run_refuses_a_folder_that_holds_one(straight_run: Path, shapes_folder: Path) -> None:
    before = {name: (straight_run / name).read_bytes() for name in ("last.pt", "metrics.jsonl", "config.json")}
    result = subprocess.run(train_command(shapes_folder, straight_run), env=ENV, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 2  # the user's choice of --out: a user error
    assert "already holds a run" in result.stderr and "--resume" in result.stderr
    assert "Traceback" not in result.stderr
    assert {name: (straight_run / name).read_bytes() for name in before} == before  # nothing was touched


def test_init_weights_need_a_resnet_backbone(shapes_folder: Path, tmp_path: Path) -> None:
    weights_file = tmp_path / "resnet.pth"
    torch.save({}, weights_file)
    result = subprocess.run(train_command(shapes_folder, tmp_path / "run", "--init", str(weights_file), "--backbone",
                                          "patches"), env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "--backbone resnet18" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "last.pt").exists()


def test_end_to_end_on_real_photos(cifar_1k: Path, tmp_path: Path) -> None:
    out = tmp_path / "cifar"
    config = TrainConfig(data=str(cifar_1k), out=str(out), classes=10, backbone="resnet18", width=16,
                         hidden_dim=256, epochs=4, batch_size=128, workers=1, progress=False, warmup_epochs=1)
    final = train(config)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 4
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.05
    assert final["clusters_in_use"] > 1
    saved = json.loads((out / "config.json").read_text())
    assert saved["image_size"] == 32 and saved["small_stem"] is True  # chosen from the 32 px photos
    assert (out / "curves.png").stat().st_size > 10_000
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 4
    assert (out / "skipped.txt").read_text() == ""


# Quality regression guard for the default recipe (patches backbone) on 1,000 real CIFAR-10 photos, 25 epochs.
# Measured on this project's 2-core CPU machine on 2026-11-28: ACC 0.357 and 0.377 with seeds 0 and 1 (k-means on
# raw pixels 0.213), about 80 s each. The threshold leaves a margin for other thread counts and BLAS builds; the run
# is fixed epochs, not a time budget, so a slow machine runs longer instead of scoring lower.
MIN_DEFAULT_RECIPE_ACC = 0.30


def test_default_recipe_clusters_real_photos_well_above_pixels(cifar_1k: Path, tmp_path: Path) -> None:
    from twist_core.evaluation.evaluate import EvalConfig, evaluate

    out = tmp_path / "defaults"
    train(TrainConfig(data=str(cifar_1k), out=str(out), classes=10, epochs=25, workers=1, progress=False))
    saved = json.loads((out / "config.json").read_text())
    assert (saved["backbone"], saved["width"], saved["tau"]) == ("patches", 256, 1.0)  # chosen for 32 px on a CPU
    report = evaluate(EvalConfig(source=str(out), data=str(cifar_1k), workers=1))
    assert report["acc"] >= MIN_DEFAULT_RECIPE_ACC, report["acc"]
    assert report["acc"] >= report["baselines"]["kmeans_pixels"]["acc"] + 0.05, report["baselines"]
    assert report["clusters_in_use"] == 10


def test_help_documents_every_option_and_config_file_fills_the_dataclass(tmp_path: Path) -> None:
    help_text = build_parser().format_help()
    for field, spec in TrainConfig.__dataclass_fields__.items():
        if field != "data" and spec.metadata.get("cli") is not False:  # init_sha256 is recorded, not given
            assert "--" + field.replace("_", "-") in help_text, field
    config_file = tmp_path / "train.yaml"
    config_file.write_text("classes: 7\nlr: 0.3\nlocal-crops: 2\n")
    args = build_parser().parse_args(["photos", "--config", str(config_file), "--lr", "0.2"])
    from twist_core.config import build_config

    config = build_config(TrainConfig, args, args.config)
    assert (config.classes, config.lr, config.local_crops, config.data) == (7, 0.2, 2, "photos")


def test_multicrop_and_self_labelling_train(shapes_folder: Path, tmp_path: Path) -> None:
    final = train(tiny_train_config(shapes_folder, tmp_path / "mc", local_crops=2, epochs=2,
                                    self_label_fraction=0.5))
    assert final["self_labelling"] is True and final["self_label"] > 0


@pytest.mark.parametrize("optimizer, lr", [("sgd", 0.1), ("lars", 0.5), ("adamw", 5e-4)])
def test_learning_rate_default_follows_the_optimiser(shapes_folder: Path, optimizer: str, lr: float) -> None:
    from twist_core.data.folder import require_images
    from twist_core.train.options import resolve_auto

    config = TrainConfig(data=str(shapes_folder), optimizer=optimizer, image_size=32)
    resolved = resolve_auto(config, shapes_folder, require_images(shapes_folder), torch.device("cpu"))
    assert resolved.lr == lr
    given = resolve_auto(TrainConfig(data=str(shapes_folder), optimizer=optimizer, image_size=32, lr=0.03),
                         shapes_folder, require_images(shapes_folder), torch.device("cpu"))
    assert given.lr == 0.03


def test_head_runs_once_on_all_crops_so_logit_batchnorm_spans_crop_sizes() -> None:
    from twist_core.model.network import ModelSpec, TwistModel
    from twist_core.train.loop import forward_views

    torch.manual_seed(0)
    model = TwistModel(ModelSpec(backbone="resnet18", width=8, small_stem=True, hidden_dim=32, n_classes=6,
                                 coarse_classes=(3,), overcluster=12)).train()
    views = [torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32), torch.randn(8, 3, 16, 16) * 3 + 1]
    logits, coarse, overcluster = forward_views(model, views, channels_last=False)
    assert [tuple(v.shape) for v in logits] == [(8, 6)] * 3
    assert [[tuple(v.shape) for v in head] for head in coarse] == [[(8, 3)] * 3]
    assert [[tuple(v.shape) for v in head] for head in overcluster] == [[(8, 12)] * 3]
    torch.testing.assert_close(torch.cat(coarse[0]).mean(0), torch.zeros(3), atol=1e-5, rtol=0)  # its own BN
    everything = torch.cat(logits)
    torch.testing.assert_close(everything.mean(0), torch.zeros(6), atol=1e-5, rtol=0)  # one BN over all 24
    assert everything[16:].mean(0).abs().max() > 1e-3  # the small crops are not normalised on their own


def test_paper_recipe_fills_defaults_and_is_recorded(shapes_folder: Path, tmp_path: Path) -> None:
    from twist_core.train.options import apply_recipe

    paper = apply_recipe(TrainConfig(recipe="paper", lr=0.3))
    assert (paper.backbone, paper.hidden_dim, paper.tau, paper.optimizer, paper.weight_decay, paper.local_crops,
            paper.epochs) == ("resnet50", 4096, 1.0, "lars", 1.5e-6, 12, 850)
    assert paper.lr == 0.3 and paper.self_label_fraction == pytest.approx(50 / 850)  # explicit options win
    out = tmp_path / "paper"
    train(TrainConfig(data=str(shapes_folder), out=str(out), recipe="paper", backbone="resnet18", width=8,
                      hidden_dim=32, local_crops=2, image_size=32, epochs=1, batch_size=16, workers=0,
                      progress=False))
    saved = json.loads((out / "config.json").read_text())
    assert (saved["recipe"], saved["optimizer"], saved["lr"], saved["tau"]) == ("paper", "lars", 0.5, 1.0)


def test_the_paper_recipe_is_a_shipped_file_that_config_reads() -> None:
    """``--config recipes/paper.yaml`` and ``--recipe paper`` give the same options: one file holds the recipe."""
    from twist_core.commands.train import build_parser
    from twist_core.config import build_config
    from twist_core.train.options import RECIPES, apply_recipe

    args = build_parser().parse_args(["DATA", "--config", str(RECIPES / "paper.yaml")])
    from_file = build_config(TrainConfig, args, args.config)
    assert from_file == apply_recipe(TrainConfig(data="DATA", recipe="paper"))
    assert apply_recipe(from_file) == from_file
    assert from_file.self_label_fraction == 50 / 850


def test_self_labelling_stage_restarts_the_learning_rate_and_raises_the_kept_share() -> None:
    from twist_core.train.optim import Schedule

    schedule = Schedule(total_steps=1000, warmup_steps=50, peak_lr=1.0, self_label_fraction=0.1, keep=0.5)
    assert schedule.self_label_start == 900 and schedule.warmup_end == 50
    assert schedule.at(49).lr == pytest.approx(1.0) and not schedule.at(899).self_labelling
    assert schedule.at(899).lr < 0.01
    stage = [schedule.at(step) for step in range(900, 1000)]
    assert all(plan.self_labelling for plan in stage)
    assert max(plan.lr for plan in stage) == pytest.approx(0.1)  # warm-up to 10 % of the peak, then cosine
    assert stage[0].lr < stage[9].lr and stage[-1].lr < 0.001
    assert stage[0].keep == pytest.approx(0.5) and stage[-1].keep == pytest.approx(0.599)


def test_self_labelling_stage_is_off_by_default_since_it_was_measured_not_to_help(shapes_folder: Path) -> None:
    from twist_core.data.folder import require_images
    from twist_core.train.options import resolve_auto

    files = require_images(shapes_folder)
    for backbone, fraction in (("patches", 0.0), ("resnet18", 0.0)):
        config = TrainConfig(data=str(shapes_folder), backbone=backbone, image_size=32)
        assert resolve_auto(config, shapes_folder, files, torch.device("cpu")).self_label_fraction == fraction
    explicit = TrainConfig(data=str(shapes_folder), backbone="resnet18", image_size=32, self_label_fraction=0.2)
    assert resolve_auto(explicit, shapes_folder, files, torch.device("cpu")).self_label_fraction == 0.2
