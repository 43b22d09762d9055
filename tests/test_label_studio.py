"""Label Studio both ways, against a real Label Studio server on loopback (REST API over httpx).

Out: the app's exported tasks and labelling config go into a new project; every task must come back from the
server with its prediction, and its image URL must serve the image's bytes (local-files storage).
Back: annotations made on that server (a different choice, a new label name, a skipped task, a task labelled
twice) are exported by the server as JSON and applied with ``twist import-labels``, one undoable change each.

The server lives in its own venv (tests/helpers/install_label_studio.sh); without it these tests skip, or fail
under TWIST_REQUIRE_DATA (CI). The import's other cases run on files in Label Studio's documented export format.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import REPO, free_port

from app.exporters import LABEL_STUDIO_PREFIX, image_url_prefix, label_studio_tasks
from app.labelstudio import url_path
from twist_core.curate.curation import EXCLUDED, CurationError, CurationStore, Record
from twist_core.deploy.infer import OnnxModel
from twist_core.index.metadata import read_manifest
from twist_core.layout import META_FILE

LS_VENV = Path(os.environ.get("TWIST_LABEL_STUDIO_VENV", "/opt/ls-venv"))
LS_BIN = LS_VENV / "bin" / "label-studio"
TEMPLATE = LS_VENV / "twist-template-data"  # a migrated database: the server starts in seconds, not minutes
# The loopback-only account the install script put in the template (same values there).
USER_EMAIL, USER_PASSWORD = "twist-test@localhost", "twist-test-password"
USER_TOKEN = "7c2f0e5a9d4b4f1e8a3c6b2d0f9e8d7c6b5a4f3e"
START_TIMEOUT = 240.0  # a start without the template migrates a new database: about 80 s on 2 busy cores


def open_store(bundle: dict[str, Path], state: Path) -> CurationStore:
    manifest = read_manifest(bundle["index"])
    return CurationStore(state / "curation.sqlite", bundle["index"] / manifest["dir"] / META_FILE,
                         OnnxModel(bundle["model"], device="cpu").class_names)


def import_labels(export: Path, bundle: dict[str, Path], state: Path, *extra: str
                  ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "twist_core.cli", "import-labels", str(export), "--index",
                           str(bundle["index"]), "--state-dir", str(state), *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def choices(name: str) -> list[dict]:
    return [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [name]}}]


# ---- the real server
@pytest.fixture(scope="module")
def label_studio(app_bundle: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """Label Studio serving the dataset's parent folder as its local-files document root."""
    if not LS_BIN.exists():
        message = f"Label Studio is not installed at {LS_BIN}: run bash tests/helpers/install_label_studio.sh"
        if os.environ.get("TWIST_REQUIRE_DATA"):
            pytest.fail(message)
        pytest.skip(message)
    data = tmp_path_factory.mktemp("label-studio-data")
    if TEMPLATE.is_dir():
        shutil.copytree(TEMPLATE, data, dirs_exist_ok=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # its own venv, none of our modules
    env.update(LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED="true", LATEST_VERSION_CHECK="false",
               LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=str(app_bundle["images"].parent), COLLECT_ANALYTICS="false")
    log = open(data / "server.log", "w")  # noqa: SIM115 (closed with the server)
    server = subprocess.Popen(
        [str(LS_BIN), "start", "--no-browser", "--internal-host", "127.0.0.1", "-p", str(port), "--data-dir",
         str(data), "--username", USER_EMAIL, "--password", USER_PASSWORD, "--user-token", USER_TOKEN,
         "--enable-legacy-api-token"], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Token {USER_TOKEN}"},
                          timeout=60)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if server.poll() is not None:
                tail = (data / "server.log").read_text()[-2000:]
                pytest.fail(f"Label Studio exited with {server.returncode}: {tail}")
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"Label Studio did not answer within {START_TIMEOUT:.0f} s")
            time.sleep(0.5)
        yield client
    finally:
        client.close()
        os.killpg(server.pid, signal.SIGTERM)  # the session it was started in: the server and its children
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


@pytest.fixture(scope="module")
def project(label_studio: httpx.Client, app_bundle: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
            ) -> dict:
    """The app's Label Studio export, made by its Workspace and imported into a new project on the server."""
    from app.workspace import Workspace

    state = tmp_path_factory.mktemp("ls-state")
    workspace = Workspace(app_bundle["model"], app_bundle["index"], state)
    try:
        tasks_path, config = workspace.export_label_studio(LABEL_STUDIO_PREFIX)
        exported = json.loads(Path(tasks_path).read_text())
    finally:
        workspace.close()
    created = label_studio.post("/api/projects/", json={"title": "twist round trip", "label_config": config})
    assert created.status_code == 201, created.text
    project_id = created.json()["id"]
    storage = label_studio.post("/api/storages/localfiles/", json={
        "project": project_id, "path": str(app_bundle["images"]), "title": "dataset", "use_blob_urls": True})
    assert storage.status_code == 201, storage.text
    imported = label_studio.post(f"/api/projects/{project_id}/import", json=exported)
    assert imported.status_code == 201, imported.text
    return {"id": project_id, "exported": exported, "config": config, "state": state}


def server_tasks(label_studio: httpx.Client, project_id: int) -> list[dict]:
    answer = label_studio.get("/api/tasks/", params={"project": project_id, "page_size": 100_000, "fields": "all"})
    assert answer.status_code == 200, answer.text
    return answer.json()["tasks"]


def test_exported_tasks_arrive_with_their_predictions_and_images(label_studio: httpx.Client, project: dict,
                                                                 app_bundle: dict[str, Path]) -> None:
    exported = {t["data"]["twist_id"]: t for t in project["exported"]}
    arrived = server_tasks(label_studio, project["id"])
    assert len(arrived) == len(exported) > 200
    store = open_store(app_bundle, project["state"])
    names, records = store.names(), store.records(list(exported))
    store.close()
    for task in arrived:
        image_id = task["data"]["twist_id"]
        (prediction,) = task["predictions"]
        assert prediction["result"][0]["value"]["choices"] == [names[records[image_id].label]]
        assert prediction["model_version"] == exported[image_id]["predictions"][0]["model_version"]
        served = label_studio.get(task["data"]["image"])
        assert served.status_code == 200, f"{task['data']['image']}: {served.status_code}"
        assert served.content == (app_bundle["images"] / records[image_id].path).read_bytes()


def test_annotations_exported_by_label_studio_come_back_as_one_undoable_change(
        label_studio: httpx.Client, project: dict, app_bundle: dict[str, Path], tmp_path: Path) -> None:
    state = project["state"]
    store = open_store(app_bundle, state)
    names, k = store.names(), store.n_clusters
    tasks = sorted(server_tasks(label_studio, project["id"]), key=lambda t: t["data"]["twist_id"])
    label = {t["id"]: store.records([t["data"]["twist_id"]])[t["data"]["twist_id"]].label for t in tasks}
    renamed = k - 1  # the cluster that takes the new label name in the second import
    moved, twice, same, cancelled = tasks[0], tasks[1], tasks[2], tasks[3]
    new_name = next(t for t in tasks[4:] if label[t["id"]] != renamed)

    def annotate(task: dict, result: list[dict], **extra) -> None:
        answer = label_studio.post(f"/api/tasks/{task['id']}/annotations/", json={"result": result, **extra})
        assert answer.status_code == 201, answer.text

    annotate(moved, choices(names[(label[moved["id"]] + 1) % k]))
    annotate(twice, choices(names[(label[twice["id"]] + 1) % k]))
    annotate(twice, choices(names[(label[twice["id"]] + 2) % k]))  # the later annotation wins
    annotate(same, choices(names[label[same["id"]]]))
    annotate(cancelled, [], was_cancelled=True)
    config = project["config"].replace("  </Choices>", '    <Choice value="zebras"/>\n  </Choices>')
    assert label_studio.patch(f"/api/projects/{project['id']}", json={"label_config": config}).status_code == 200
    annotate(new_name, choices("zebras"))
    answer = label_studio.get(f"/api/projects/{project['id']}/export",
                              params={"exportType": "JSON", "download_all_tasks": "true"})
    assert answer.status_code == 200, answer.text
    export = tmp_path / "label-studio-export.json"
    export.write_bytes(answer.content)

    first = import_labels(export, app_bundle, state)
    assert first.returncode == 0, first.stderr
    assert f"read {len(tasks)} task(s)" in first.stdout
    assert "applied: 2 image(s) moved, 0 cluster(s) renamed" in first.stdout
    assert "unchanged: 1 image(s)" in first.stdout
    assert f"skipped: {len(tasks) - 5} not annotated, 1 cancelled, 0 no single choice" in first.stdout
    assert "unknown label names, not applied: 'zebras' (1 task(s))" in first.stdout
    assert "unknown images: 0" in first.stdout
    image = {t["id"]: t["data"]["twist_id"] for t in tasks}
    after = store.records(list(image.values()))
    assert after[image[moved["id"]]].label == (label[moved["id"]] + 1) % k
    assert after[image[twice["id"]]].label == (label[twice["id"]] + 2) % k
    assert after[image[moved["id"]]].status == "moved"
    for task in (same, cancelled, new_name):
        assert after[image[task["id"]]].label == label[task["id"]]

    second = import_labels(export, app_bundle, state, "--rename", f"{names[renamed]}=zebras")
    assert second.returncode == 0, second.stderr
    assert "applied: 1 image(s) moved, 1 cluster(s) renamed" in second.stdout
    assert "unchanged: 3 image(s)" in second.stdout and "unknown label names" not in second.stdout
    assert store.names()[renamed] == "zebras"
    assert store.records([image[new_name["id"]]])[image[new_name["id"]]].label == renamed

    assert "renamed cluster" in store.undo()  # the second import, name and move together
    assert store.names()[renamed] == names[renamed]
    assert store.records([image[new_name["id"]]])[image[new_name["id"]]].label == label[new_name["id"]]
    assert "2 label(s)" in store.undo()  # the first import as a whole
    assert {i: r.label for i, r in store.records(list(image.values())).items()} == {
        image[t["id"]]: label[t["id"]] for t in tasks}
    store.close()


# ---- the documented export format, without a server
def documented_task(task_id: int, data: dict, annotations: list[dict]) -> dict:
    """A task as Label Studio's JSON export writes it (the fields the import reads, and a few it ignores)."""
    return {"id": task_id, "data": data, "meta": {}, "predictions": [], "project": 1,
            "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z",
            "annotations": [{"id": task_id * 10 + n, "completed_by": 1, "was_cancelled": False,
                             "created_at": f"2026-01-0{n + 1}T00:00:00Z", "updated_at": f"2026-01-0{n + 1}T00:00:00Z",
                             "lead_time": 1.5, **a} for n, a in enumerate(annotations)]}


def test_task_urls_quote_odd_file_names_and_lead_back_to_them() -> None:
    record = Record(7, "odd dir/a b&c#1+2%.png", 0, 0.9, None, 0, "predicted")
    (task,) = label_studio_tasks([record], {0: "cats"}, "v1", dataset_root=Path("/data/my photos"))
    assert task["data"]["image"] == "/data/local-files/?d=my%20photos/odd%20dir/a%20b%26c%231%2B2%25.png"
    assert url_path(task["data"]["image"]) == "my photos/odd dir/a b&c#1+2%.png"
    assert image_url_prefix("/data/local-files/?d=photos") == "/data/local-files/?d=photos/"
    assert image_url_prefix("https://files.example/images/", Path("/data/photos")) == "https://files.example/images/"


def test_import_finds_images_by_url_and_reports_what_it_cannot_use(app_bundle: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    store = open_store(app_bundle, tmp_path / "state")
    names, k = store.names(), store.n_clusters
    records = list(store.iter_records())[:4]
    url = LABEL_STUDIO_PREFIX + app_bundle["images"].name + "/"
    other = {r.id: names[(r.label + 1) % k] for r in records}
    tasks = [
        documented_task(1, {"image": url + records[0].path}, [{"result": choices(other[records[0].id])}]),
        documented_task(2, {"image": "/data/upload/1/" + records[1].path.replace("/", "-"), "twist_id": 99999},
                        [{"result": choices(other[records[1].id])}]),
        documented_task(3, {"image": url + records[0].path, "twist_id": records[2].id},  # id and URL disagree
                        [{"result": choices(other[records[2].id])}]),
        documented_task(4, {"image": url + records[3].path}, [{"result": choices("excluded")}]),
        documented_task(5, {"image": url + records[1].path}, [{"result": choices(names[0])}]),
        documented_task(6, {"image": url + records[1].path}, [{"result": choices(names[1])}]),  # conflicts with 5
        documented_task(7, {"image": url + records[2].path}, [{"result": []}]),
        documented_task(8, {"image": url + records[2].path}, [  # malformed results are not a choice
            {"id": "a8", "result": [{"type": "choices", "from_name": "label", "value": [names[0]]}]}]),
        documented_task(9, {"image": url + records[2].path}, [
            {"result": [{"type": "choices", "from_name": "label", "value": {"choices": names[0]}}]}]),
    ]
    export = tmp_path / "export.json"
    export.write_text(json.dumps(tasks))
    dry = import_labels(export, app_bundle, tmp_path / "state", "--dry-run")
    assert dry.returncode == 0 and "would apply (dry run): 2 image(s) moved" in dry.stdout, dry.stdout + dry.stderr
    assert store.history() == []
    done = import_labels(export, app_bundle, tmp_path / "state")
    assert done.returncode == 0, done.stderr
    assert "applied: 2 image(s) moved" in done.stdout and "3 no single choice" in done.stdout
    assert f"wrote:\n  {tmp_path / 'state' / 'curation.sqlite'}  " in done.stdout and "wrote:" not in dry.stdout
    assert f"conflicting: 1 image(s) given different labels by different tasks, left as they were " \
           f"(ids {records[1].id})" in done.stdout
    assert "unknown images: 2 (id 99999" in done.stdout and f"id {records[2].id} (" in done.stdout
    after = store.records([r.id for r in records])
    assert names[after[records[0].id].label] == other[records[0].id]
    assert after[records[3].id].label == EXCLUDED
    assert after[records[1].id].label == records[1].label and after[records[2].id].label == records[2].label
    assert len(store.history()) == 1
    store.close()


def test_relabel_renames_together_and_undoes_as_one(app_bundle: dict[str, Path], tmp_path: Path) -> None:
    store = open_store(app_bundle, tmp_path / "state")
    names = store.names()
    first = next(store.iter_records())
    store.relabel("swap", {first.id: 1}, {0: names[1], 1: names[0]})  # a swap is no clash once both are renamed
    assert store.names()[0] == names[1] and store.names()[1] == names[0]
    assert store.records([first.id])[first.id].label == 1
    with pytest.raises(CurationError, match="would both be called"):
        store.relabel("clash", {}, {2: names[3].upper()})
    assert store.undo() == "swap" and store.names() == names
    assert store.records([first.id])[first.id].status == "predicted" and store.history() == []
    store.close()


def test_import_refuses_bad_input_in_one_line_and_changes_nothing(app_bundle: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    state = tmp_path / "state"
    for name, text in [("not-json.json", "id,label\n1,cat\n"),
                       ("nested.json", "[" * 100_000 + "]" * 100_000),
                       ("json-min.json", json.dumps([{"image": "/data/x.png", "label": "cat", "id": 1}])),
                       ("to-import.json", json.dumps([{"data": {"image": "/data/x.png"}, "predictions": []}]))]:
        (tmp_path / name).write_text(text)
        result = import_labels(tmp_path / name, app_bundle, state)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.startswith("twist import-labels: error: ") and result.stderr.count("\n") == 1
    (tmp_path / "ok.json").write_text("[]")
    cases = [(tmp_path / "missing.json", ()), (tmp_path / "ok.json", ("--rename", "no-such-cluster=x")),
             (tmp_path / "ok.json", ("--rename", "0")), (tmp_path / "ok.json", ("--rename", "0=x", "1=X"))]
    for export, extra in cases:
        result = import_labels(export, app_bundle, state, *extra)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    missing_index = subprocess.run([sys.executable, "-m", "twist_core.cli", "import-labels", str(tmp_path / "ok.json"),
                                    "--index", str(tmp_path / "nowhere")], cwd=REPO, capture_output=True, text=True)
    assert missing_index.returncode == 2 and "no index in" in missing_index.stderr
    store = open_store(app_bundle, state)
    assert store.history() == [] and all(r.status == "predicted" for r in store.iter_records())
    store.close()
