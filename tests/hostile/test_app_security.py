"""What the app serves, tried by a hostile or careless user against a live ``twist app`` on loopback.

The dataset folder here is the worst case: it holds script files (``evil.html``, ``evil.svg``), the model,
the index and the app's own state, and one of its images is a symlink to a file outside the dataset, the
working folder and the temp folder. Only images may come back, and only as images.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import urllib.parse
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import REPO, export_label_index, start_app_server, stop_app_server
from gradio_client import Client, handle_file
from PIL import Image

from twist_core.index.image_index import IndexReader
from twist_core.io_utils import OUTPUT_MARKER

SCRIPT = "<script>fetch('/gradio_api/info').then(r => document.title = 'pwned')</script>"
FORMULA_FILES = ("=2+3.png", "@SUM(A1).png", "+1.png", "-1.png")
FORMULA_NAME = '=HYPERLINK("http://example.invalid","click")'
SAFE_IMAGE_TYPES = {"image/jpeg", "image/png", "image/webp", "image/gif"}


@pytest.fixture(scope="module")
def hostile(tiny_run: Path, shapes_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A dataset folder that holds everything it should not, served by a live app whose temp folder is its own."""
    base = tmp_path_factory.mktemp("hostile_app")
    images = base / "images"
    shutil.copytree(shapes_folder, images / "shapes")
    for formula in FORMULA_FILES:  # file names a spreadsheet would run as formulas
        shutil.copy(shapes_folder / "discs" / "000.png", images / formula)
    outside = base / "outside"  # neither the dataset, the server's working folder nor its temp folder
    outside.mkdir()
    Image.fromarray(np.full((40, 30, 3), (200, 30, 90), np.uint8)).save(outside / "far.png")
    os.symlink(outside / "far.png", images / "shapes" / "linked.png")
    model = export_label_index(tiny_run, images, images / "model.onnx", base / "labels.csv", images / "index")
    for folder in (images, images / "shapes"):
        (folder / "evil.html").write_text(f"<html><body>{SCRIPT}</body></html>")
        (folder / "evil.svg").write_text(f'<svg xmlns="http://www.w3.org/2000/svg">{SCRIPT}</svg>')
    state = images / "state"
    server_tmp = base / "server-tmp"
    server_tmp.mkdir()
    process, url = start_app_server({"model": model, "index": images / "index"}, state,
                                    env={"TMPDIR": str(server_tmp)})
    try:
        yield {"url": url, "images": images, "index": images / "index", "state": state, "model": model,
               "log": state.parent / f"{state.name}-server.log"}
    finally:
        stop_app_server(process)


def file_url(server: dict, path: str | Path) -> str:
    return server["url"] + "gradio_api/file=" + str(path)


def served_urls(value: object) -> list[str]:
    """Every file URL inside a result of ``Client(download_files=False)``."""
    if isinstance(value, dict):
        return [value["url"]] if isinstance(value.get("url"), str) else \
            [u for v in value.values() for u in served_urls(v)]
    if isinstance(value, list | tuple):
        return [u for v in value for u in served_urls(v)]
    return []


def test_script_files_in_the_dataset_are_never_served(hostile: dict) -> None:
    images = hostile["images"]
    for name in ("evil.html", "evil.svg", "shapes/evil.html", "shapes/evil.svg"):
        for url in (file_url(hostile, images / name), file_url(hostile, urllib.parse.quote(str(images / name))),
                    hostile["url"] + "gradio_api/file/" + str(images / name)):
            response = httpx.get(url)
            assert response.status_code in (403, 404), (url, response.status_code, response.headers)
            assert b"<script>" not in response.content


def test_the_index_model_and_state_inside_the_dataset_are_never_served(hostile: dict) -> None:
    secrets = [hostile["model"], hostile["state"] / "curation.sqlite", *hostile["index"].rglob("*.sqlite"),
               hostile["index"] / "manifest.json"]
    assert len(secrets) >= 4 and all(p.is_file() for p in secrets)
    for path in secrets:
        response = httpx.get(file_url(hostile, path))
        assert response.status_code in (403, 404), (path, response.status_code)
        assert b"SQLite format" not in response.content and path.read_bytes()[:32] not in response.content
    log = hostile["log"].read_text()
    for folder in ("index", "state", "model"):
        assert f"the {folder}" in log and "under the dataset folder" in log, log[-3000:]


def test_the_app_marks_the_folders_it_writes(hostile: dict) -> None:
    for folder in (hostile["state"], hostile["state"] / "thumbnails"):
        assert (folder / OUTPUT_MARKER).is_file(), folder


def test_images_the_app_hands_out_come_back_as_images_only(hostile: dict) -> None:
    client = Client(hostile["url"], verbose=False, download_files=False)
    index = IndexReader.open(hostile["index"], "cpu")
    first = index.records(None, order_by="id", limit=1)[0]
    biggest = max(index.cluster_summary(), key=lambda c: c["size"])["cluster"]
    index.close()
    urls = served_urls(client.predict("size", api_name="/overview"))
    urls += served_urls(client.predict(biggest, 0, False, 0, 1, api_name="/open_cluster"))
    urls += served_urls(client.predict(first.id, api_name="/select_image"))
    assert len(urls) > 5
    for url in urls:
        response = httpx.get(url if url.startswith("http") else hostile["url"] + url.lstrip("/"))
        assert response.status_code == 200, url
        assert response.headers["content-type"] in SAFE_IMAGE_TYPES, (url, response.headers)
        assert response.headers.get("x-content-type-options") == "nosniff", (url, response.headers)
        disposition = response.headers.get("content-disposition", "")
        assert disposition.startswith("inline") and all(c not in disposition for c in "\r\n<>"), disposition
        Image.open(io.BytesIO(response.content)).verify()


def test_an_image_linked_from_outside_every_served_folder_opens_in_the_detail_view(hostile: dict) -> None:
    index = IndexReader.open(hostile["index"], "cpu")
    linked = next(r for r in index.records(None, order_by="id", limit=index.size) if r.path.endswith("linked.png"))
    index.close()
    picture, details, _, _ = Client(hostile["url"], verbose=False).predict(linked.id, api_name="/select_image")
    assert "linked.png" in details
    with Image.open(picture) as shown, Image.open(hostile["images"] / "shapes" / "linked.png") as original:
        sharp = original.convert("RGB").resize(shown.size, Image.Resampling.NEAREST)  # small: shown enlarged
        assert np.array_equal(np.asarray(shown.convert("RGB")), np.asarray(sharp))


def test_the_repository_and_system_files_stay_out_of_reach(hostile: dict) -> None:
    for path in (Path("/etc/passwd"), REPO / "pyproject.toml", hostile["images"] / "shapes" / "000.png"):
        response = httpx.get(file_url(hostile, path))
        assert response.status_code in (403, 404), (path, response.status_code)


def read_csv(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_exported_csvs_never_hold_a_formula_and_json_stays_faithful(hostile: dict, tmp_path: Path) -> None:
    client = Client(hostile["url"], verbose=False)
    index = IndexReader.open(hostile["index"], "cpu")
    cluster = index.records(None, order_by="id", limit=1)[0].cluster
    index.close()
    client.predict(cluster, FORMULA_NAME, api_name="/rename_cluster")
    rows = read_csv(client.predict(api_name="/export_csv"))
    assert {r["path"] for r in rows} >= {"'" + name for name in FORMULA_FILES}
    assert "'" + FORMULA_NAME in {r["label_name"] for r in rows}
    tasks_path, _ = client.predict("/data/local-files/?d=", api_name="/export_label_studio")
    tasks = json.loads(Path(tasks_path).read_text())
    choices = {t["predictions"][0]["result"][0]["value"]["choices"][0] for t in tasks}
    assert FORMULA_NAME in choices  # JSON is read by programs, not spreadsheets: it keeps the name as written

    bundle = tmp_path / "formulas.zip"
    with zipfile.ZipFile(bundle, "w") as archive:
        for name in FORMULA_FILES:
            archive.write(hostile["images"] / name, name)
        archive.writestr("=broken.jpg", b"not an image")
    batch, _ = client.predict([handle_file(str(bundle))], api_name="/batch_label")
    rows = read_csv(batch)
    assert [r["file"] for r in rows] == ["'" + name for name in (*FORMULA_FILES, "=broken.jpg")]
    for row in rows:
        assert all(not cell.startswith(("=", "+", "-", "@", "\t", "\r")) for cell in row.values()), row


def test_an_uploaded_script_comes_back_only_as_a_download(hostile: dict) -> None:
    for name, kind in (("evil.svg", "image/svg+xml"), ("evil.html", "text/html")):
        uploaded = httpx.post(hostile["url"] + "gradio_api/upload",
                              files={"files": (name, (hostile["images"] / name).read_bytes(), kind)})
        assert uploaded.status_code == 200, uploaded.text
        response = httpx.get(file_url(hostile, uploaded.json()[0]))
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/octet-stream", response.headers
        assert response.headers["content-disposition"].startswith("attachment")
        assert response.headers.get("x-content-type-options") == "nosniff"
