"""Outputs never eat inputs (issue 36, item 9): every command refuses, in one line with exit code 2 and before
writing anything, an output that is one of its inputs, lies in the image folder it reads, or would replace a file
of an index, a training run, an exported model or a labels table; and a symbolic link at an output path is
replaced, never written through."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO


def twist(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m twist_core.cli ARGS`` run in ``cwd`` (the paths of the cases are relative to it)."""
    return subprocess.run([sys.executable, "-m", "twist_core.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.fixture()
def workspace(app_bundle: dict[str, Path], tiny_run: Path, shapes_folder: Path, tmp_path: Path) -> Path:
    """Copies of a real index, model (+ card), labels table, run and image folder: a failing refusal damages
    only these."""
    source = app_bundle["model"].parent
    shutil.copytree(app_bundle["index"], tmp_path / "ix")
    for name in ("model.onnx", "model.json", "labels.csv", "labels.meta.json", "labels.embeddings.npy"):
        shutil.copy(source / name, tmp_path / name)
    shutil.copytree(tiny_run, tmp_path / "run")
    shutil.copytree(shapes_folder, tmp_path / "data")
    (tmp_path / "curated.csv").write_text("path,label\ndiscs/000.png,0\nstripes/000.png,1\n")
    return tmp_path


def snapshot(root: Path) -> dict[str, str]:
    """Every file and link under ``root`` with its content hash (or link target): a refusal changes none."""
    found = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder, name)
            found[str(path.relative_to(root))] = ("link:" + os.readlink(path) if path.is_symlink()
                                                 else hashlib.sha256(path.read_bytes()).hexdigest())
    return found


TINY = ("--classes", "4", "--width", "8", "--hidden-dim", "64", "--image-size", "32", "--epochs", "1",
        "--workers", "0", "--no-progress", "--checkpoint-every", "0")
REFUSED = {  # the cases first, then one per command and kind of file
    "merges-json-over-manifest": ("suggest-merges", "ix", "--measure", "modularity", "--json", "ix/manifest.json"),
    "merges-plot-over-model": ("suggest-merges", "ix", "--measure", "modularity", "--plot", "model.onnx"),
    "export-card-over-manifest": ("export", "run", "--out", "ix/manifest.onnx"),
    "export-card-over-run-config": ("export", "run", "--out", "run/config.onnx"),
    "export-card-over-table-meta": ("export", "run", "--out", "labels.meta.onnx"),
    "train-out-is-data": ("train", "data", "--out", "data", *TINY),
    "train-out-inside-data": ("train", "data", "--out", "data/run", *TINY),
    "train-out-inside-eval-data": ("train", "data/discs", "--eval-data", "data", "--out", "data/run", *TINY),
    "finetune-out-is-data": ("finetune", "run", "--labels", "curated.csv", "--data", "data", "--out", "data",
                             "--epochs", "1", "--workers", "0", "--no-progress"),
    "merges-json-and-plot-same-file": ("suggest-merges", "ix", "--measure", "modularity", "--json", "out.x",
                                       "--plot", "out.x"),
    "search-json-over-table-meta": ("search", "ix", "--id", "0", "--json", "labels.meta.json"),
    "duplicates-json-over-card": ("duplicates", "ix", "--json", "model.json"),
    "duplicates-json-over-checkpoint": ("duplicates", "ix", "--json", "run/last.pt"),
    "eval-json-into-data": ("eval", "run", "data", "--json", "data/report.json"),
    "label-table-into-index": ("label", "model.onnx", "data", "--out", "ix/labels.csv", "--workers", "0"),
    "label-tree-is-data": ("label", "model.onnx", "data", "--out", "new.csv", "--export-tree", "data",
                           "--workers", "0"),
    "index-over-run": ("index", "labels.csv", "--model", "model.onnx", "--out", "run"),
    "index-out-is-its-table": ("index", "labels.csv", "--out", "labels.csv"),
    "demo-workspace-in-index": ("demo", "--workspace", "ix/demo", "--no-app"),
    "finetune-out-is-run": ("finetune", "run", "--labels", "curated.csv", "--data", "data", "--out", "run"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_an_output_over_an_input_is_refused_and_nothing_is_written(case: str, workspace: Path) -> None:
    before = snapshot(workspace)
    result = twist(*REFUSED[case], cwd=workspace)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and " error: " in result.stderr, result.stderr[-2000:]
    assert "nothing was written" in result.stderr
    assert snapshot(workspace) == before


def test_a_link_at_an_output_path_is_replaced_not_written_through(workspace: Path) -> None:
    """``--plot`` followed a symbolic link and wrote the PNG over its target; ``--json`` and ``--plot`` now
    replace the link itself, so the file it pointed to (here: the model) keeps every byte."""
    model = (workspace / "model.onnx").read_bytes()
    victim = workspace / "notes.txt"
    victim.write_text("keep me\n")
    (workspace / "tree.png").symlink_to("model.onnx")
    (workspace / "merges.json").symlink_to("notes.txt")
    result = twist("suggest-merges", "ix", "--measure", "modularity", "--bootstrap", "0", "--plot", "tree.png",
                   "--json", "merges.json", cwd=workspace)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (workspace / "model.onnx").read_bytes() == model and victim.read_text() == "keep me\n"
    assert not (workspace / "tree.png").is_symlink() and (workspace / "tree.png").read_bytes()[:4] == b"\x89PNG"
    assert not (workspace / "merges.json").is_symlink() and '"pairs"' in (workspace / "merges.json").read_text()
    assert not list(workspace.glob(".*.tmp")), "no temporary file is left beside an output"


def test_outputs_beside_the_inputs_still_work(workspace: Path) -> None:
    """The check refuses only what would be destroyed: a new report beside the index, a second export over the
    same model, and eval's confusion matrix in the run folder (its default) are written as before."""
    result = twist("suggest-merges", "ix", "--measure", "modularity", "--bootstrap", "0", "--json", "merges.json",
                   "--plot", "ix-tree.png", cwd=workspace)
    assert result.returncode == 0, result.stderr[-2000:]
    result = twist("export", "run", "--out", "model.onnx", "--no-verify", cwd=workspace)
    assert result.returncode == 0, result.stderr[-2000:]
    result = twist("eval", "run", "data", "--no-baselines", cwd=workspace)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (workspace / "run" / "eval_confusion.png").is_file()


@pytest.fixture(scope="module")
def indexed_folder(app_bundle: dict[str, Path], tiny_run: Path, shapes_folder: Path,
                   tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image folder ``data`` with its labels table and the index built from it (whose recorded root is
    ``data``), a run, and the model that labelled it, all in one folder."""
    from twist_core.index.build import IndexConfig, build_index
    from twist_core.label.labeller import LabelConfig, label_folder

    base = tmp_path_factory.mktemp("indexed-folder")
    shutil.copytree(shapes_folder, base / "data")
    shutil.copytree(tiny_run, base / "run")
    for name in ("model.onnx", "model.json"):
        shutil.copy(app_bundle["model"].parent / name, base / name)
    label_folder(LabelConfig(model=str(base / "model.onnx"), folder=str(base / "data"), out=str(base / "labels.csv"),
                             workers=0, progress=False))
    build_index(IndexConfig(source=str(base / "labels.csv"), model=str(base / "model.onnx"), out=str(base / "dix"),
                            device="cpu"))
    return base


INTO_THE_INDEXED_IMAGES = {  # every command that reads an index (or a labels table) writes nothing among its images
    "merges-plot-over-an-image": ("suggest-merges", "dix", "--measure", "modularity", "--bootstrap", "0",
                                  "--plot", "data/discs/001.png"),
    "merges-json-into-images": ("suggest-merges", "dix", "--measure", "modularity", "--bootstrap", "0",
                                "--json", "data/merges.json"),
    "merges-of-table-plot-into-images": ("suggest-merges", "labels.csv", "--measure", "modularity", "--bootstrap", "0",
                                         "--plot", "data/tree.png"),
    "search-json-over-an-image": ("search", "dix", "--id", "0", "--json", "data/discs/002.png"),
    "duplicates-json-into-images": ("duplicates", "dix", "--json", "data/stripes/dups.json"),
    "finetune-out-into-the-index-images": ("finetune", "run", "--index", "dix", "--out", "data/finetuned",
                                           "--epochs", "1", "--workers", "0", "--no-progress"),
    "index-of-table-into-its-images": ("index", "labels.csv", "--out", "data/ix"),
    "index-of-folder-into-it": ("index", "data", "--model", "model.onnx", "--out", "data/ix"),
    "label-table-into-the-folder-read": ("label", "model.onnx", "data", "--out", "data/labels.csv",
                                         "--workers", "0", "--no-progress"),
}


@pytest.mark.parametrize("case", sorted(INTO_THE_INDEXED_IMAGES))
def test_an_output_among_the_images_an_index_was_built_from_is_refused(case: str, indexed_folder: Path) -> None:
    """``--plot data/discs/001.png`` replaced a picture of the dataset with the dendrogram: the index's recorded
    image folder counts as read, as the folder given to twist label does."""
    before = snapshot(indexed_folder)
    result = twist(*INTO_THE_INDEXED_IMAGES[case], cwd=indexed_folder)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and "inside the image folder" in result.stderr, result.stderr[-2000:]
    assert snapshot(indexed_folder) == before


def test_an_export_never_replaces_the_model_of_another_checkpoint(workspace: Path) -> None:
    """``twist export RUN2 --out M.onnx`` replaced the model (and card) of another run; the card names the
    checkpoint a model came from, and only that checkpoint (the same file, grown by further training, or a copy
    of it) may be exported over it again."""
    import torch

    checkpoint = torch.load(workspace / "run" / "last.pt", map_location="cpu", weights_only=False)
    first = next(name for name, value in checkpoint["model"].items() if value.is_floating_point())
    checkpoint["model"][first] = checkpoint["model"][first] + 0.01
    torch.save(checkpoint, workspace / "other.pt")
    before = snapshot(workspace)
    result = twist("export", "other.pt", "--out", "model.onnx", "--no-verify", cwd=workspace)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert "another checkpoint" in result.stderr and "nothing was written" in result.stderr, result.stderr
    assert snapshot(workspace) == before
    assert twist("export", "other.pt", "--out", "other.onnx", "--no-verify", cwd=workspace).returncode == 0
    checkpoint["model"][first] = checkpoint["model"][first] + 0.01  # the same checkpoint file, trained on
    torch.save(checkpoint, workspace / "other.pt")
    result = twist("export", "other.pt", "--out", "other.onnx", "--no-verify", cwd=workspace)
    assert result.returncode == 0, result.stderr[-2000:]
