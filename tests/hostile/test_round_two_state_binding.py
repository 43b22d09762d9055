"""A curation state folder belongs to one index lineage: every command that opens it with another index refuses
(one line, exit 2, the store untouched byte for byte), and curation set aside when the model changed can be
restored with ``twist restore-state``.

Everything is real: a tiny trained run exported twice (two models of the same K), three indexes made by the
real pipeline (A: model 1 on the shapes, B: model 1 on other images, C: model 2 on the shapes), and each command
as a child process of ``python -m twist_core.cli``.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, draw_shapes_folder, free_port

from twist_core.curate.curation import EXCLUDED, CurationStore
from twist_core.curate.store_file import curated_names, curation_path
from twist_core.deploy.export import ExportConfig, export_model
from twist_core.deploy.infer import OnnxModel
from twist_core.index.build import IndexConfig, build_index
from twist_core.index.metadata import IndexMetadata, meta_path
from twist_core.io_utils import file_sha256
from twist_core.label.labeller import LabelConfig, label_folder

STORE_TABLES = ("names", "merges", "overrides", "confirmed")


def twist(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "twist_core.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})


def label_and_index(model: Path, images: Path, out: Path) -> Path:
    table = out.parent / f"{out.name}-labels.csv"
    label_folder(LabelConfig(model=str(model), folder=str(images), out=str(table), workers=0, progress=False))
    build_index(IndexConfig(source=str(table), model=str(model), out=str(out), device="cpu"))
    return out


@pytest.fixture(scope="module")
def indexes(tiny_run: Path, shapes_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Model 1 and model 2 (the same run exported twice, K = 4 both), and indexes A, B and C."""
    base = tmp_path_factory.mktemp("binding")
    other_images = draw_shapes_folder(base / "other-images", n_per_class=8, seed=7)
    m1 = export_model(ExportConfig(run=str(tiny_run), out=str(base / "m1.onnx"), class_names="a,b,c,d"))
    m2 = export_model(ExportConfig(run=str(tiny_run), out=str(base / "m2.onnx"), class_names="w,x,y,z"))
    return {"m1": m1, "m2": m2, "run": tiny_run, "images": shapes_folder, "base": base,
            "A": label_and_index(m1, shapes_folder, base / "A"),
            "B": label_and_index(m1, other_images, base / "B"),
            "C": label_and_index(m2, shapes_folder, base / "C")}


FULL = ("1 name(s)", "1 merge(s)", "2 move(s)", "1 exclusion(s)", "5 confirmation(s)", "5 undo step(s)")
NO_MOVES = ("1 name(s)", "1 merge(s)", "5 confirmation(s)", "3 undo step(s)")  # the store: no move at all


def curate(index: Path, state: Path, model: Path, moves: bool = True) -> None:
    """Names, a merge, confirmations and (``moves``) moves and an exclusion: what a store keys by cluster or image."""
    store = CurationStore(state / "curation.sqlite", meta_path(index), OnnxModel(model, device="cpu").class_names)
    try:
        ids = [r.id for r in store.iter_records()]
        store.rename(0, "round things")
        store.merge([1], 2)
        if moves:
            store.move(ids[:2], 3)
            store.move(ids[2:3], EXCLUDED)
        store.confirm(ids[3:8])
    finally:
        store.close()


def index_info(index: Path) -> dict:
    meta = IndexMetadata(meta_path(index))
    try:
        return meta.info()
    finally:
        meta.close()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def store_rows(state: Path) -> dict[str, list[tuple]]:
    with sqlite3.connect(state / "curation.sqlite") as db:
        rows = {table: sorted(db.execute(f"SELECT * FROM {table}")) for table in STORE_TABLES}
        rows["undo_log"] = db.execute("SELECT action, at, previous FROM undo_log ORDER BY seq").fetchall()
    return rows


def assert_refused(result: subprocess.CompletedProcess, prog: str, index: Path, holds: tuple[str, ...] = FULL
                   ) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    line = result.stderr
    assert line.startswith(f"twist {prog}: error: ") and "another index" in line, line
    assert str(index.parent / "A") in line and str(index) in line, line  # both indexes named
    for held in holds:
        assert held in line, (held, line)


@pytest.mark.parametrize("other", ["B", "C"])  # B: same model, other images; C: other model, same images
def test_suggest_merges_refuses_a_state_folder_of_another_index_and_changes_nothing(
        indexes: dict[str, Path], tmp_path: Path, other: str) -> None:
    state = tmp_path / "state"
    curate(indexes["A"], state, indexes["m1"], moves=False)
    before = snapshot(state)
    result = twist("suggest-merges", str(indexes[other]), "--state-dir", str(state))
    assert_refused(result, "suggest-merges", indexes[other], NO_MOVES)
    assert snapshot(state) == before, "the store and its folder are untouched byte for byte"
    assert twist("suggest-merges", str(indexes["A"]), "--state-dir", str(state)).returncode == 0, "its own index"
    assert curated_names(curation_path(state), index_info(indexes["A"]))[0] == "round things"
    assert curated_names(curation_path(state), index_info(indexes[other])) == {}, "no names of another index"


def test_finetune_import_labels_and_the_app_refuse_it_too(indexes: dict[str, Path], tmp_path: Path) -> None:
    state = tmp_path / "state"
    curate(indexes["A"], state, indexes["m1"])
    before = snapshot(state)
    out = tmp_path / "finetuned"
    result = twist("finetune", str(indexes["run"]), "--index", str(indexes["B"]), "--state-dir", str(state),
                   "--out", str(out), "--epochs", "1", "--workers", "0", "--no-progress")
    assert_refused(result, "finetune", indexes["B"])
    assert not out.exists(), "nothing written"
    (tmp_path / "export.json").write_text("[]")
    result = twist("import-labels", str(tmp_path / "export.json"), "--index", str(indexes["B"]), "--state-dir",
                   str(state))
    assert_refused(result, "import-labels", indexes["B"])
    try:
        result = twist("app", "--model", str(indexes["m2"]), "--index", str(indexes["C"]), "--state-dir", str(state),
                       "--port", str(free_port()), "--no-warm-thumbnails", timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("twist app started on a state folder of another index")
    assert_refused(result, "app", indexes["C"])
    assert snapshot(state) == before


def test_a_new_generation_of_the_same_index_keeps_its_curation(indexes: dict[str, Path], tmp_path: Path) -> None:
    """``twist index --update`` over the same folder (one image more): same lineage, the store still opens."""
    images, index = tmp_path / "images", tmp_path / "ix"
    shutil.copytree(indexes["images"], images)
    label_and_index(indexes["m1"], images, index)
    state = tmp_path / "state"
    curate(index, state, indexes["m1"])
    before = store_rows(state)
    shutil.copy(images / "discs" / "000.png", images / "discs" / "new.png")
    updated = twist("index", "--update", "--out", str(index), "--model", str(indexes["m1"]), "--device", "cpu")
    assert updated.returncode == 0 and "added 1" in updated.stdout, updated.stdout + updated.stderr
    result = twist("suggest-merges", str(index), "--state-dir", str(state))
    assert result.returncode == 0, result.stderr
    assert store_rows(state) == before


def test_an_empty_store_may_serve_another_index(indexes: dict[str, Path], tmp_path: Path) -> None:
    state = tmp_path / "state"
    CurationStore(state / "curation.sqlite", meta_path(indexes["A"]), []).close()
    result = twist("suggest-merges", str(indexes["B"]), "--state-dir", str(state))
    assert result.returncode == 0, result.stderr


def test_curation_set_aside_by_a_model_change_is_restored_exactly(indexes: dict[str, Path], tmp_path: Path) -> None:
    """Relabel with model 2 (curation set aside), back to model 1, ``twist restore-state``: all of it is back.

    The relabels read the tables of indexes A (model 1) and C (model 2) of the same images.
    """
    index, tables = tmp_path / "ix", {m: str(indexes["base"] / f"{ix}-labels.csv") for m, ix in (("m1", "A"),
                                                                                                ("m2", "C"))}
    build_index(IndexConfig(source=tables["m1"], model=str(indexes["m1"]), out=str(index), device="cpu"))
    curate(index, index, indexes["m1"])
    before = store_rows(index)
    relabel = twist("index", tables["m2"], "--update", "--out", str(index), "--device", "cpu")
    assert relabel.returncode == 0, relabel.stderr
    assert twist("suggest-merges", str(index), "--state-dir", str(index)).returncode == 0  # the model changed
    (aside,) = index.glob("curation-set-aside-*.json")
    assert json.loads(aside.read_text())["names"] == {"0": "round things"}
    emptied = store_rows(index)
    assert emptied["names"] == [] and emptied["confirmed"] == [] and emptied["undo_log"] == []

    wrong = twist("restore-state", str(aside), "--index", str(index))  # the index holds model 2 now
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1 and "model" in wrong.stderr, wrong.stderr
    assert store_rows(index) == emptied

    back = twist("index", tables["m1"], "--update", "--out", str(index), "--device", "cpu")
    assert back.returncode == 0, back.stderr
    restored = twist("restore-state", str(aside), "--index", str(index))
    assert restored.returncode == 0, restored.stderr
    assert "restored 1 name(s), 1 merge(s), 2 move(s), 5 confirmation(s), 5 undo step(s)" in restored.stdout
    assert f"wrote:\n  {index / 'curation.sqlite'}  " in restored.stdout  # the file it changed, named
    assert f"wrote:\n  {index}/  the index" in relabel.stdout
    assert store_rows(index) == before
    store = CurationStore(index / "curation.sqlite", meta_path(index), OnnxModel(indexes["m1"]).class_names)
    try:
        assert store.notice is None and store.names()[0] == "round things"
        assert store.undo().startswith("confirmed: 5 image(s)")  # the undo log works as it did
    finally:
        store.close()


def test_restore_state_refuses_a_file_that_is_not_a_set_aside_curation(indexes: dict[str, Path],
                                                                         tmp_path: Path) -> None:
    state = tmp_path / "state"
    curate(indexes["A"], state, indexes["m1"])
    before = snapshot(state)
    for name, text in [("garbage.json", "{not json"), ("list.json", "[]"),
                       ("bad-id.json", json.dumps({"model_sha256": "x", "names": {}, "merges": {}, "confirmed": [],
                                                   "moves": [{"image_id": 10**30, "cluster": 1}], "undo_log": []})),
                       ("bad-cluster.json", json.dumps({"model_sha256": file_sha256(indexes["m1"]), "merges": {},
                                                        "names": {"99": "x"}, "confirmed": [], "moves": [],
                                                        "undo_log": []}))]:
        (tmp_path / name).write_text(text)
        result = twist("restore-state", str(tmp_path / name), "--index", str(indexes["A"]), "--state-dir", str(state))
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert "Traceback" not in result.stderr
    assert "cluster 99, which the model does not have" in result.stderr
    assert snapshot(state) == before
