"""``twist import-labels`` on exports that are odd or hostile: a task that names an image by id alone must say it
comes from this index, an export of another index is refused, a malformed task is named and left out while the
rest is applied, a huge id is an unknown image, and nothing it prints can drive the terminal.

A real index of the tiny run's export, files in Label Studio's JSON export format, ``twist import-labels`` as a
child process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, export_label_index

from app.exporters import label_studio_tasks
from twist_core.curate.curation import CurationStore
from twist_core.deploy.infer import OnnxModel
from twist_core.index.metadata import IndexMetadata, meta_path

URL = "/data/local-files/?d=shapes/"


@pytest.fixture(scope="module")
def indexed(tiny_run: Path, shapes_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("import-tasks")
    model = export_label_index(tiny_run, shapes_folder, base / "m.onnx", base / "labels.csv", base / "ix")
    meta = IndexMetadata(meta_path(base / "ix"))
    uid = meta.info()["uid"]
    meta.close()
    return {"index": base / "ix", "model": model, "uid": uid, "names": OnnxModel(model, device="cpu").class_names}


def open_store(indexed: dict[str, Any], state: Path) -> CurationStore:
    return CurationStore(state / "curation.sqlite", meta_path(indexed["index"]), indexed["names"])


def task(number: int, data: dict[str, Any], name: str, **extra: Any) -> dict[str, Any]:
    result = [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [name]}}]
    return {"id": number, "data": data, "annotations": [{"id": number, "result": result}], **extra}


def import_labels(tasks: list[Any], indexed: dict[str, Any], state: Path) -> subprocess.CompletedProcess:
    export = state.parent / "export.json"
    export.write_text(json.dumps(tasks))
    return subprocess.run([sys.executable, "-m", "twist_core.cli", "import-labels", str(export), "--index",
                           str(indexed["index"]), "--state-dir", str(state)],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env=os.environ.copy())


def other_cluster(indexed: dict[str, Any], store: CurationStore, image_id: int) -> tuple[int, str]:
    label = store.records([image_id])[image_id].label
    cluster = (label + 1) % len(indexed["names"])
    return cluster, indexed["names"][cluster]


def test_the_app_export_names_its_index(indexed: dict[str, Any], tmp_path: Path) -> None:
    store = open_store(indexed, tmp_path / "state")
    records = list(store.iter_records())[:3]
    store.close()
    tasks = label_studio_tasks(records, dict(enumerate(indexed["names"])), "v1", index_uid=indexed["uid"])
    assert {t["data"]["twist_index"] for t in tasks} == {indexed["uid"]}


def test_an_id_without_an_image_url_is_applied_only_when_the_task_names_this_index(indexed: dict[str, Any],
                                                                                   tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = open_store(indexed, state)
    first, second = [r.id for r in store.iter_records()][:2]
    to_first, to_second = other_cluster(indexed, store, first), other_cluster(indexed, store, second)
    result = import_labels([task(1, {"twist_id": first}, to_first[1]),
                            task(2, {"twist_id": second, "twist_index": indexed["uid"]}, to_second[1])], indexed, state)
    assert result.returncode == 0, result.stderr
    assert "applied: 1 image(s) moved" in result.stdout, result.stdout
    assert f"unknown images: 1 (id {first}" in result.stdout, result.stdout
    after = store.records([first, second])
    assert after[second].label == to_second[0] and after[first].label != to_first[0]
    store.close()


def test_an_export_of_another_index_is_refused_and_changes_nothing(indexed: dict[str, Any], tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = open_store(indexed, state)
    first = next(r.id for r in store.iter_records())
    tasks = [task(1, {"image": URL + store.records([first])[first].path, "twist_id": first,
                      "twist_index": "0123456789abcdef0123456789abcdef"}, other_cluster(indexed, store, first)[1])]
    result = import_labels(tasks, indexed, state)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stdout + result.stderr
    assert "another index" in result.stderr and "0123456789ab" in result.stderr and "task #1" in result.stderr
    assert indexed["uid"][:12] in result.stderr and "Traceback" not in result.stderr
    assert store.history() == []
    store.close()


def test_malformed_tasks_are_named_and_left_out_while_the_rest_is_applied(indexed: dict[str, Any],
                                                                        tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = open_store(indexed, state)
    good = next(r.id for r in store.iter_records())
    path = store.records([good])[good].path
    cluster, name = other_cluster(indexed, store, good)
    tasks = [
        {"id": 11, "data": {"image": URL + path}, "annotations": 5},
        {"id": 12, "data": {"image": URL + path}, "annotations": [{"id": 1, "result": 7}]},
        task(13, {"image": "http://[bad"}, name),
        task(14, {"image": URL + path, "twist_id": 10**30}, name),
        task(15, {"image": URL + path, "twist_id": good}, name),
        {"id": 16, "data": "notadict", "annotations": []},  # data that is not an object aborted the whole import
        ["a task that is not an object"],
    ]
    result = import_labels(tasks, indexed, state)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stdout + result.stderr
    assert "applied: 1 image(s) moved" in result.stdout, result.stdout
    assert "5 malformed task(s) left out" in result.stdout and "task #1 (id 11)" in result.stdout, result.stdout
    assert "task #2 (id 12)" in result.stdout and "task #3 (id 13)" in result.stdout, result.stdout
    assert "task #6 (id 16): its data is not an object" in result.stdout, result.stdout
    assert "task #7: it is not an object" in result.stdout, result.stdout
    assert f"unknown images: 1 (id {10**30}" in result.stdout, result.stdout
    assert store.records([good])[good].label == cluster
    store.close()


def test_nothing_printed_can_drive_the_terminal(indexed: dict[str, Any], tmp_path: Path) -> None:
    hostile = "\x1b]0;owned\x07\x1b[2J\x1b[31mred\u202efdp.exe\r"
    tasks = [task(1, {"image": URL + "nowhere/" + hostile}, indexed["names"][0]),
             task(2, {"image": URL + "x.png", "twist_id": hostile}, indexed["names"][0]),
             {"id": 3, "data": {"image": hostile}, "annotations": 5}]
    result = import_labels(tasks, indexed, tmp_path / "state")
    assert result.returncode == 0, result.stdout + result.stderr
    printed = result.stdout + result.stderr
    assert not any(c in printed for c in "\x1b\x07\u202e\r"), repr(printed)
    assert "\\x1b]0;owned" in result.stdout, "shown escaped, not dropped"
