"""``twist index --update`` with another model: every image is labelled and embedded again, ids kept, and the
curation made for the old model's clusters is set aside (kept in a file, no longer applied), in the app too.

Everything is real: a tiny trained run, ``twist finetune`` on the app's curation store, ``twist export``, the
``twist index`` command as a child process (killed part-way once), and a live ``twist app`` on loopback.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import REPO, export_label_index, start_app_server, stop_app_server
from gradio_client import Client

from twist_core.curate.curation import EXCLUDED, CurationStore
from twist_core.curate.store_file import ACTION_TIME_FORMAT, CurationError, curated_names, curation_path
from twist_core.deploy.export import ExportConfig, export_model
from twist_core.deploy.infer import OnnxModel
from twist_core.index.image_index import IndexReader
from twist_core.index.metadata import FAULT_ENV, UNKNOWN_MODEL, meta_path, model_at, model_history, read_manifest
from twist_core.io_utils import file_sha256
from twist_core.vectors import normalized


def twist(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "twist_core.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def index_state(index: Path) -> tuple[dict[str, tuple[int, int]], dict]:
    """path -> (id, cluster) of every indexed image, and the index's info."""
    opened = IndexReader.open(index, "cpu")
    try:
        ids = opened.ids_for_paths(opened.paths())
        rows = {h.path: (h.id, h.cluster) for h in (opened.get(i) for i in ids.values())}
        return rows, opened.info
    finally:
        opened.close()


def open_store(index: Path, state: Path, model: Path) -> CurationStore:
    return CurationStore(state / "curation.sqlite", meta_path(index), OnnxModel(model, device="cpu").class_names)


@pytest.fixture
def indexed(tiny_run: Path, shapes_folder: Path, tmp_path: Path) -> dict[str, Path]:
    """The 48 drawn shapes labelled and indexed with the tiny run's model (K = 4)."""
    images = tmp_path / "images"
    shutil.copytree(shapes_folder, images)
    model = export_label_index(tiny_run, images, tmp_path / "m1.onnx", tmp_path / "labels.csv", tmp_path / "ix")
    return {"images": images, "model": model, "index": tmp_path / "ix", "base": tmp_path}


def test_update_with_a_finetuned_model_relabels_every_image_and_sets_old_curation_aside(
        indexed: dict[str, Path], tiny_run: Path) -> None:
    from twist_core.curate.finetune import FinetuneConfig, finetune

    index, images = indexed["index"], indexed["images"]
    before, info_before = index_state(index)
    store = open_store(index, index, indexed["model"])
    sizes = {row["cluster"]: row["size"] for row in store.summary()}
    source, target = sorted(sizes, key=lambda c: -sizes[c])[:2]
    store.merge([source], target)
    store.rename(target, "things")
    others = [r.id for r in store.page(target, limit=6)]
    store.move(others[:2], EXCLUDED)
    store.confirm(others[2:5])
    excluded = others[:2]
    store.close()

    run2 = indexed["base"] / "run2"
    finetune(FinetuneConfig(run=str(tiny_run), index=str(index), data=str(images), out=str(run2), epochs=1,
                            workers=0, progress=False))
    model2 = export_model(ExportConfig(run=str(run2), out=str(indexed["base"] / "m2.onnx")))
    result = twist("index", "--update", "--out", str(index), "--model", str(model2), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert f"the model changed, so all {len(before)} images were labelled and embedded again" in result.stdout
    assert "labelling and embedding every image again" in result.stderr

    after, info = index_state(index)
    assert info["uid"] == info_before["uid"] and info["generation"] > info_before["generation"]
    assert info["model_sha256"] == file_sha256(model2) != info_before["model_sha256"]
    assert {p: i for p, (i, _) in after.items()} == {p: i for p, (i, _) in before.items()}, "ids are kept"
    model = OnnxModel(model2, device="cpu")
    assert {c for _, c in after.values()} <= set(range(3)) == set(range(model.n_classes))
    probe = sorted(after)[:5]  # the stored vectors and clusters are the new model's
    probs, embeddings = model.predict([images / p for p in probe])
    opened = IndexReader.open(index, "cpu")
    stored = np.stack([opened.vector(after[p][0]) for p in probe])
    opened.close()
    _, old_embeddings = OnnxModel(indexed["model"], device="cpu").predict([images / p for p in probe])
    assert (stored * normalized(embeddings)).sum(1).min() > 0.9999  # decoding paths differ by ~1e-4
    assert np.abs(stored - normalized(old_embeddings)).max() > 0.01
    assert [after[p][1] for p in probe] == probs.argmax(1).tolist()

    store = open_store(index, index, model2)  # the app (or finetune) opening the store after the update
    try:
        notice = store.notice or ""
        assert "set aside" in notice and "3 confirmation(s), 1 merge(s), 1 name(s)" in notice
        assert str(run2.resolve()) in notice and "exclusions still apply" in notice
        kept = json.loads(next(index.glob("curation-set-aside-*.json")).read_text())
        assert kept["merges"] == {str(source): target} and kept["names"] == {str(target): "things"}
        assert {c["image_id"] for c in kept["confirmed"]} == set(others[2:5]) and kept["undo_log"]
        assert kept["model_sha256"] == info_before["model_sha256"] and kept["learned_by"][0]["images"] > 0
        assert store.merges() == {} and store.names() == dict(enumerate(model.class_names))
        records = store.records(list(after[p][0] for p in after))
        assert {i for i, r in records.items() if r.status == "excluded"} == set(excluded)
        assert {r.status for i, r in records.items() if i not in excluded} == {"predicted"}
        with pytest.raises(CurationError, match="nothing to undo"):
            store.undo()
    finally:
        store.close()

    again = twist("index", "--update", "--out", str(index), "--device", "cpu")
    assert again.returncode == 0 and "added 0, removed 0" in again.stdout, again.stderr


def test_the_model_history_says_which_model_the_index_held_at_a_moment() -> None:
    history = model_history({}, "m1", now=100.0)
    assert history == [{"model_sha256": "m1", "since": 100.0}]
    assert model_history({"model_history": history, "model_sha256": "m1"}, "m1", now=150.0) == history
    history = model_history({"model_history": history, "model_sha256": "m1"}, "m2", now=200.0)
    info = {"model_sha256": "m2", "model_history": history}
    assert [model_at(info, t) for t in (50.0, 100.0, 199.0, 200.0, 300.0)] == ["m1", "m1", "m1", "m2", "m2"]
    assert model_at(info, None) == UNKNOWN_MODEL  # changed, and the store logged no time
    assert model_at({"model_sha256": "m1", "model_history": history[:1]}, None) == "m1"  # never changed
    legacy = model_history({"model_sha256": "m0"}, "m2", now=300.0)  # an index from before the history
    assert legacy == [{"model_sha256": "m0", "since": None}, {"model_sha256": "m2", "since": 300.0}]
    assert model_at({"model_history": legacy}, 10.0) == "m0"


def test_a_store_that_never_recorded_its_model_is_set_aside_when_its_changes_predate_the_relabel(
        indexed: dict[str, Path]) -> None:
    """Stores written before stores recorded their model: the index's model history decides, by the time of
    the store's last change. Renamed before the relabel: set aside. Renamed after it: kept."""
    import onnx

    index, base = indexed["index"], indexed["base"]
    store = open_store(index, index, indexed["model"])
    store.rename(0, "circles")
    store.merge([1], 2)
    store.close()
    later = base / "later-state"
    later.mkdir()
    shutil.copy(index / "curation.sqlite", later / "curation.sqlite")
    for path, moment in ((index, None), (later, time.time() + 3600)):
        with contextlib.closing(sqlite3.connect(path / "curation.sqlite")) as db, db:
            db.execute("DELETE FROM binding WHERE key = 'model_sha256'")
            if moment is not None:  # a change made in the app after the relabel below
                db.execute("UPDATE undo_log SET at = ?", (time.strftime(ACTION_TIME_FORMAT, time.localtime(moment)),))
    resaved = onnx.load(indexed["model"])  # the same network under another fingerprint: cluster numbers may differ
    resaved.doc_string = "another model"
    model2 = base / "m2.onnx"
    onnx.save(resaved, model2)
    result = twist("index", "--update", "--out", str(index), "--model", str(model2), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    _, info = index_state(index)
    assert [entry["model_sha256"] for entry in info["model_history"]] == [file_sha256(indexed["model"]),
                                                                         file_sha256(model2)]
    assert curated_names(curation_path(index), info) == {}, "the old model's names are not on the new model's clusters"
    assert curated_names(curation_path(later), info)[0] == "circles"
    store = open_store(index, index, model2)
    try:
        assert "set aside" in (store.notice or "") and store.merges() == {}
        kept = json.loads(next(index.glob("curation-set-aside-*.json")).read_text())
        assert kept["names"] == {"0": "circles"} and kept["model_sha256"] == file_sha256(indexed["model"])
    finally:
        store.close()
    store = open_store(index, later, model2)
    try:
        assert store.notice is None and store.merges() == {1: 2} and store.names()[0] == "circles"
    finally:
        store.close()


def test_a_relabel_killed_before_it_commits_leaves_the_old_index_and_the_rerun_finishes(
        indexed: dict[str, Path], tiny_run: Path) -> None:
    """A re-export over the same model file is noticed by its fingerprint; the relabel is crash-safe."""
    index = indexed["index"]
    before, info_before = index_state(index)
    store = open_store(index, index, indexed["model"])
    store.rename(0, "an old name")  # given to the old model's cluster 0: search must not show it on the new one
    store.close()
    (index / "labels-0123456789ab.csv.parts").mkdir()  # an older relabelling that was never finished
    export_model(ExportConfig(run=str(tiny_run), out=str(indexed["model"]), class_names="w,x,y,z"))
    killed = twist("index", "--update", "--out", str(index), "--device", "cpu", env={FAULT_ENV: "before-manifest"})
    assert killed.returncode == 75, killed.stderr
    assert index_state(index) == (before, info_before), "a killed relabel changes nothing"

    rerun = twist("index", "--update", "--out", str(index), "--device", "cpu")
    assert rerun.returncode == 0 and f"all {len(before)} images were labelled" in rerun.stdout, rerun.stderr
    after, info = index_state(index)
    assert info["model_sha256"] == file_sha256(indexed["model"]) and info["uid"] == info_before["uid"]
    assert {p: i for p, (i, _) in after.items()} == {p: i for p, (i, _) in before.items()}
    opened = IndexReader.open(index, "cpu")
    assert set(opened.cluster_names().values()) <= {"w", "x", "y", "z"}
    opened.close()
    assert len(list(index.glob("labels-*.csv"))) == 1 and not list(index.glob("labels-*.parts"))
    assert read_manifest(index)["generation"] > 1


def test_the_running_app_follows_a_relabel_with_the_new_model_and_says_what_it_set_aside(
        indexed: dict[str, Path], tiny_run: Path) -> None:
    state = indexed["base"] / "state"
    process, url = start_app_server({"model": indexed["model"], "index": indexed["index"]}, state)
    try:
        api, client = httpx.Client(base_url=url + "api/v1/", timeout=60), Client(url, verbose=False)
        moved = api.get("labels").json()["labels"][0]
        target = next(c for c in range(4) if c != moved["cluster"])
        client.predict(str(moved["id"]), target, api_name="/move_images")
        assert api.get(f"images/{moved['id']}").json()["status"] == "moved"

        model2 = export_model(ExportConfig(run=str(tiny_run), out=str(indexed["base"] / "m2.onnx"),
                                           class_names="w,x,y,z"))
        update = twist("index", "--update", "--out", str(indexed["index"]), "--model", str(model2), "--device", "cpu")
        assert update.returncode == 0 and "the model changed" in update.stdout, update.stderr

        names = {c["name"] for c in api.get("clusters").json()}
        assert names <= {"w", "x", "y", "z"}, names
        image = api.get(f"images/{moved['id']}").json()
        assert image["status"] == "predicted" and image["name"] in names, "a move made for the old model is not applied"
        _, _, summary = client.predict("size", api_name="/overview")
        assert "set aside" in summary and "1 move(s)" in summary
        kept = json.loads(next(state.glob("curation-set-aside-*.json")).read_text())
        assert [m["image_id"] for m in kept["moves"]] == [moved["id"]]
    finally:
        stop_app_server(process)
    from app.workspace import AppUserError, Workspace

    with pytest.raises(AppUserError, match=f"come from another model.*--model {model2}"):  # its clusters are m2's
        Workspace(indexed["model"], indexed["index"], state_dir=indexed["base"] / "other-state")
