"""`twist eval`, evaluation during training, and --time-budget."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, draw_shapes_folder, tiny_train_config

from twist_core.train.budget import fit_total_steps, parse_duration
from twist_core.train.loop import train


def test_parse_duration() -> None:
    assert parse_duration("90") == 90 and parse_duration("20m") == 1200 and parse_duration("1h30m") == 5400
    assert parse_duration("1.5h") == 5400 and parse_duration("45s") == 45
    with pytest.raises(ValueError, match="cannot read"):
        parse_duration("twenty minutes")


def test_fit_total_steps_leaves_room_for_evaluations() -> None:
    assert fit_total_steps(10, 1.0, 100.0, 10, 0.0, 5) == 110
    # 100 s left, 1 s/step, 10 steps/epoch, eval every epoch costing 5 s: n steps + 5 (n/10 + 1) <= 100.
    total = fit_total_steps(0, 1.0, 100.0, 10, 5.0, 1)
    assert 60 <= total <= 66
    # An evaluation worth 300 steps: 23.5 s left at 0.01 s/step, 8 steps/epoch, every 2 epochs, 3 s each. A
    # fixed-point iteration swung between 0 and 2,050 steps and ended on 0: the run stopped after one epoch.
    total = fit_total_steps(8, 0.01, 23.5, 8, 3.0, 2)
    more = total - 8
    assert more >= 100 and more * 0.01 + (more // 16 + 1) * 3.0 <= 23.5
    assert fit_total_steps(5, 1.0, 2.0, 10, 5.0, 1) == 5  # not even the final evaluation fits: no more steps


def test_eval_command_reports_metrics_baselines_and_confusion(tiny_run: Path, shapes_folder: Path,
                                                             tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    result = subprocess.run([sys.executable, "-m", "twist_core.cli", "eval", str(tiny_run), str(shapes_folder),
                             "--json", str(report_path)], capture_output=True, text=True, timeout=300,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "k-means on pixels" in result.stdout and "kNN accuracy" in result.stdout
    report = json.loads(report_path.read_text())
    assert report["n_images"] == 48 and report["classes"] == ["discs", "stripes"]
    for name in ("acc", "nmi", "ami", "ari", "knn_acc"):
        assert 0.0 <= report[name] <= 1.0
    assert report["purity"] >= 0.5  # two balanced classes: every cluster's majority holds at least half
    assert set(report["baselines"]) == {"kmeans_embeddings", "kmeans_pixels"}
    assert sum(row["size"] for row in report["per_cluster"]) == 48
    assert report_path.with_suffix(".png").stat().st_size > 5_000


def test_eval_needs_class_folders(tiny_run: Path, tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    for image in sorted((draw_shapes_folder(tmp_path / "s", 2)).rglob("*.png")):
        (flat / f"{image.parent.name}_{image.name}").write_bytes(image.read_bytes())
    result = subprocess.run([sys.executable, "-m", "twist_core.cli", "eval", str(tiny_run), str(flat)],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 2 and "class subfolders" in result.stderr


def test_time_budget_ends_on_time_with_evaluations_logged(tmp_path: Path) -> None:
    data = draw_shapes_folder(tmp_path / "shapes", n_per_class=64)
    out = tmp_path / "run"
    budget = 30.0
    started = time.perf_counter()
    final = train(tiny_train_config(data, out, epochs=10_000, time_budget=f"{budget:.0f}s", eval_data=str(data),
                                    eval_every=2, self_label_fraction=0.2))
    took = time.perf_counter() - started
    assert abs(took - budget) <= 0.1 * budget, f"took {took:.1f} s for a {budget:.0f} s budget"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["epoch"] == 0 and "eval" in rows[0]  # evaluated before training
    assert "eval" in rows[-1] and rows[-1]["epoch"] == final["epoch"]  # and at the end
    assert any(row.get("self_labelling") for row in rows)  # the schedule's last stage was reached
    assert rows[-1]["step"] < 10_000 * 8


def test_training_eval_onnx_eval_and_label_give_the_same_probabilities(shapes_folder: Path, tmp_path: Path) -> None:
    """One preprocessing contract: the run evaluated in PyTorch, its exported model under `twist eval`, and
    `twist label` see the same pixels, so they give the same probabilities (images of odd, non-square sizes
    go through the 256/224 resize and the central crop)."""
    import numpy as np
    from PIL import Image

    from twist_core.deploy.export import ExportConfig, export_model
    from twist_core.evaluation.evaluate import EvalConfig, _predict_source
    from twist_core.label.labeller import LabelConfig, label_folder, read_labels

    data = tmp_path / "data"
    sizes = [(90, 70), (64, 101), (121, 81), (77, 77), (100, 66), (83, 95)]
    for label in ("discs", "stripes"):
        (data / label).mkdir(parents=True)
        for i, source in enumerate(sorted((shapes_folder / label).glob("*.png"))[:len(sizes)]):
            image = Image.open(source).convert("RGB").resize(sizes[i], Image.Resampling.BILINEAR)
            image.save(data / label / (f"{i}.jpg" if i % 2 else f"{i}.png"), quality=90)
    run = tmp_path / "run"
    train(tiny_train_config(data, run, image_size=72, epochs=1, batch_size=6))
    model = export_model(ExportConfig(run=str(run), out=str(tmp_path / "m.onnx")))
    card = json.loads(model.with_suffix(".json").read_text())
    assert (card["input_size"], card["resize_size"]) == (72, 82)

    run_probs, _, run_data = _predict_source(EvalConfig(source=str(run), data=str(data), workers=0, device="cpu"))
    onnx_probs, _, onnx_data = _predict_source(EvalConfig(source=str(model), data=str(data), workers=0))
    label_folder(LabelConfig(model=str(model), folder=str(data), out=str(tmp_path / "t.csv"), workers=0,
                             progress=False, topk=card["n_classes"]))
    rows, _ = read_labels(tmp_path / "t.csv")
    by_path = {row["path"]: dict(json.loads(row["topk"])) for row in rows}
    label_probs = np.array([[by_path[path][k] for k in range(card["n_classes"])] for path in onnx_data.files])

    assert run_data.files == onnx_data.files and len(run_data.files) == 12
    np.testing.assert_allclose(onnx_probs, run_probs, atol=1e-4, rtol=0)
    np.testing.assert_allclose(label_probs, run_probs, atol=1e-4, rtol=0)
