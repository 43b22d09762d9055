"""An index belongs to the model that labelled it: ``twist finetune RUN --index IX`` and ``twist import-labels
--model M`` refuse a run or a model that is not the index's (one line, exit 2) before writing anything.

Real runs (the tiny run, K = 4; one with K = 6; one with K = 4 from another seed), real exports, a real index of
the tiny run's export, and each command as a child process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, export_label_index, tiny_train_config

from twist_core.curate.curation import CurationStore
from twist_core.deploy.export import ExportConfig, export_model
from twist_core.deploy.infer import OnnxModel
from twist_core.index.metadata import meta_path


def twist(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "twist_core.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=os.environ.copy())


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def setting(tiny_run: Path, shapes_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny run's index of the shapes (K = 4), with confirmations in its curation store; two other runs."""
    from twist_core.train.loop import train

    base = tmp_path_factory.mktemp("index-model")
    runs = {"k6": base / "run-k6", "k4-other": base / "run-k4-other"}
    train(tiny_train_config(shapes_folder, runs["k6"], classes=6, epochs=1))
    train(tiny_train_config(shapes_folder, runs["k4-other"], classes=4, epochs=1, seed=1))
    model = export_label_index(tiny_run, shapes_folder, base / "m.onnx", base / "labels.csv", base / "ix")
    store = CurationStore(base / "ix" / "curation.sqlite", meta_path(base / "ix"),
                          OnnxModel(model, device="cpu").class_names)
    store.confirm([r.id for r in store.iter_records()][:10])
    store.close()
    k6_model = export_model(ExportConfig(run=str(runs["k6"]), out=str(base / "m6.onnx"),
                                         class_names="discs,stripes,animals,vehicles,extra one,extra two"))
    return {"index": base / "ix", "model": model, "run": tiny_run, "k6_model": k6_model, **runs}


@pytest.mark.parametrize("run", ["k6", "k4-other"])  # K differs (was a KeyError) / K equal (was learned silently)
def test_finetune_refuses_an_index_made_by_another_run_before_writing_anything(
        setting: dict[str, Path], tmp_path: Path, run: str) -> None:
    before = snapshot(setting["index"])
    out = tmp_path / "finetuned"
    result = twist("finetune", str(setting[run]), "--index", str(setting["index"]), "--out", str(out), "--epochs",
                   "1", "--workers", "0", "--no-progress")
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("twist finetune: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr and str(setting["model"]) in result.stderr, result.stderr
    assert not out.exists(), "nothing written: a rerun is not blocked by half a run"
    assert snapshot(setting["index"]) == before


def test_finetune_accepts_the_index_of_its_own_export(setting: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "finetuned"
    result = twist("finetune", str(setting["run"]), "--index", str(setting["index"]), "--out", str(out), "--epochs",
                   "1", "--workers", "0", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "finetune.json").read_text())["labelled_images"] == 10


def test_import_labels_refuses_a_model_that_did_not_label_the_index(setting: dict[str, Path], tmp_path: Path) -> None:
    """K = 6 names against a K = 4 index used to move an image to cluster 5, which exists nowhere else."""
    store = CurationStore(setting["index"] / "curation.sqlite", meta_path(setting["index"]), [])
    first = store.records([r.id for r in store.iter_records()][:1])
    store.close()
    (image_id, record), = first.items()
    export = tmp_path / "export.json"
    export.write_text(json.dumps([{"id": 1, "data": {"image": f"/data/local-files/?d=x/{record.path}",
                                                      "twist_id": image_id},
                                   "annotations": [{"id": 1, "result": [
                                       {"from_name": "label", "to_name": "image", "type": "choices",
                                        "value": {"choices": ["extra two"]}}]}]}]))
    before = snapshot(setting["index"])
    result = twist("import-labels", str(export), "--index", str(setting["index"]), "--model",
                   str(setting["k6_model"]))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("twist import-labels: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert str(setting["k6_model"]) in result.stderr and str(setting["model"]) in result.stderr, result.stderr
    assert snapshot(setting["index"]) == before
    same = twist("import-labels", str(export), "--index", str(setting["index"]), "--model", str(setting["model"]),
                 "--dry-run")
    assert same.returncode == 0 and "unknown label names, not applied: 'extra two'" in same.stdout, same.stderr
