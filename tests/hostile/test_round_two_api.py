"""The JSON API of a live ``twist app``, round two: its edges, its temp files and its event loop.

Ids beyond SQLite's 64-bit integers, pages past the end, vectors of no direction, CSV exports that used to
leave a folder behind each, and uploads whose decoding used to stop every other request.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import start_app_server, stop_app_server
from PIL import Image

from twist_core.index.image_index import IndexReader

HUGE_SIDE = 6300  # 39.7 M pixels, under the default --max-pixels; a solid colour compresses to ~100 KB
UPLOADS = 4


@pytest.fixture(scope="module")
def api(app_bundle: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    base = tmp_path_factory.mktemp("round_two_api")
    server_tmp = base / "server-tmp"
    server_tmp.mkdir()
    process, url = start_app_server(app_bundle, base / "state", "--no-warm-thumbnails",
                                    env={"TMPDIR": str(server_tmp)})
    index = IndexReader.open(app_bundle["index"], "cpu")
    try:
        yield {"http": httpx.Client(base_url=url + "api/v1/", timeout=120), "url": url, "tmp": server_tmp,
               "dim": index.dim, "process": process}
    finally:
        index.close()
        stop_app_server(process)


@pytest.mark.parametrize("route", ["images/{}", "images/{}/file", "search/id/{}", "clusters/{}/images"])
@pytest.mark.parametrize("number", [2**63, 2**64 + 5, 10**30, -(2**63) - 1])
def test_ids_beyond_64_bits_are_not_found_not_a_crash(api: dict, route: str, number: int) -> None:
    answer = api["http"].get(route.format(number))
    assert answer.status_code in (400, 404), answer.text
    assert "detail" in answer.json()


def test_a_page_past_the_end_is_empty(api: dict) -> None:
    http = api["http"]
    cluster = http.get("clusters").json()[0]
    first = http.get(f"clusters/{cluster['id']}/images", params={"page": 0}).json()
    assert first["images"] and first["total"] == cluster["size"]
    last_page = (cluster["size"] - 1) // first["page_size"]
    for page in (last_page + 1, last_page + 7, 10**30):
        past = http.get(f"clusters/{cluster['id']}/images", params={"page": page})
        assert past.status_code == 200 and past.json()["images"] == [] and past.json()["total"] == cluster["size"]
    review = http.get("review", params={"page": 10**30})
    assert review.status_code == 200, review.text


def folders_in(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_dir()}


def test_csv_exports_leave_no_folder_behind(api: dict) -> None:
    http, before = api["http"], folders_in(api["tmp"])
    for _ in range(5):
        answer = http.get("labels", params={"format": "csv"})
        assert answer.status_code == 200 and answer.text.startswith("id,")
    time.sleep(0.5)  # the folder goes once the answer is sent
    assert folders_in(api["tmp"]) == before


def test_the_export_folder_goes_with_the_app(app_bundle: dict[str, Path], tmp_path: Path) -> None:
    server_tmp = tmp_path / "server-tmp"
    server_tmp.mkdir()
    process, url = start_app_server(app_bundle, tmp_path / "state", "--no-warm-thumbnails",
                                    env={"TMPDIR": str(server_tmp)})
    try:
        assert httpx.get(url + "api/v1/labels", params={"format": "csv"}, timeout=60).status_code == 200
        assert list(server_tmp.glob("twist-app-exports-*"))
    finally:
        stop_app_server(process)
    assert not list(server_tmp.glob("twist-app-exports-*"))


@pytest.mark.parametrize("vector, problem", [
    ("zeros", "zero"), ("tiny", "zero"), ("overflow", "too large"), ("NaN", "finite"), ("Infinity", "finite"),
    ("1e39", "finite"),
])
def test_a_vector_of_no_direction_is_refused(api: dict, vector: str, problem: str) -> None:
    dim = api["dim"]
    whole = {"zeros": ["0"] * dim, "tiny": ["1e-45"] * dim, "overflow": ["3e38"] * dim}
    values = whole.get(vector, ["1"] * (dim - 1) + [vector])  # or one bad number among good ones
    body = '{"vector": [' + ",".join(values) + '], "k": 3}'
    answer = api["http"].post("search/vector", content=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == 400, answer.text
    assert problem in answer.json()["detail"]
    assert api["http"].post("search/vector", json={"vector": [1.0] * dim, "k": 3}).status_code == 200


def test_huge_uploads_leave_every_other_request_answered_at_once(api: dict, tmp_path: Path) -> None:
    picture = tmp_path / "huge.png"
    Image.new("RGB", (HUGE_SIDE, HUGE_SIDE), (40, 120, 200)).save(picture)
    data, statuses = picture.read_bytes(), []
    assert len(data) < 300_000

    def upload() -> None:
        answer = httpx.post(api["url"] + "api/v1/search/upload", files={"file": ("huge.png", data, "image/png")},
                            timeout=300)
        statuses.append(answer.status_code)

    uploads = [threading.Thread(target=upload) for _ in range(UPLOADS)]
    for thread in uploads:
        thread.start()
    waits = []
    while any(thread.is_alive() for thread in uploads):
        start = time.monotonic()
        assert api["http"].get("clusters").status_code == 200
        waits.append(time.monotonic() - start)
        time.sleep(0.05)
    assert statuses == [200] * UPLOADS
    assert len(waits) >= 3 and max(waits) < 1.0, f"cheap requests waited up to {max(waits):.2f} s: {waits}"


def test_json_answers_say_nosniff(api: dict) -> None:
    for route in ("clusters", "labels", "review", "images/0"):
        answer = api["http"].get(route)
        assert answer.status_code == 200 and answer.headers["x-content-type-options"] == "nosniff"
        json.loads(answer.text)
