"""The JSON API (``/api/v1``) through real HTTP on loopback, with and without --auth, against the index itself."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import start_app_server, stop_app_server
from PIL import Image

from twist_core.deploy.infer import OnnxModel
from twist_core.index.image_index import IndexReader

USER, PASSWORD = "bo", "a long and careful password"


@pytest.fixture(scope="module")
def servers(app_bundle: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """One open app and one behind --auth (from a file), on the same bundle."""
    base = tmp_path_factory.mktemp("api")
    (base / "auth.txt").write_text(f"{USER}:{PASSWORD}\n")
    open_process, open_url = start_app_server(app_bundle, base / "open-state")
    try:
        locked_process, locked_url = start_app_server(app_bundle, base / "locked-state", "--auth",
                                                      str(base / "auth.txt"))
    except Exception:
        stop_app_server(open_process)
        raise
    index = IndexReader.open(app_bundle["index"], "cpu")
    try:
        yield {"open": httpx.Client(base_url=open_url + "api/v1/", timeout=60),
               **app_bundle, "locked_url": locked_url, "ix": index, "open_state": base / "open-state"}
    finally:
        index.close()
        stop_app_server(open_process)
        stop_app_server(locked_process)


def test_clusters_pages_and_records_match_the_index(servers: dict) -> None:
    api, index = servers["open"], servers["ix"]
    clusters = api.get("clusters").json()
    expected = {c["cluster"]: c["size"] for c in index.cluster_summary()}
    assert {c["id"]: c["size"] for c in clusters} == expected
    assert [c["size"] for c in clusters] == sorted(expected.values(), reverse=True)
    assert all(set(c) == {"id", "name", "size", "mean_confidence"} and c["name"] for c in clusters)

    biggest = clusters[0]
    page = api.get(f"clusters/{biggest['id']}/images", params={"page": 0}).json()
    assert page["total"] == biggest["size"]
    confidences = [image["confidence"] for image in page["images"]]
    assert confidences == sorted(confidences, reverse=True) and len(page["images"]) == min(60, biggest["size"])

    walked, cursor, by_number = [], None, []
    while True:  # the cursor walks the cluster to its end, as the page numbers do
        answer = api.get(f"clusters/{biggest['id']}/images", params={"after": cursor} if cursor else {}).json()
        walked += [image["id"] for image in answer["images"]]
        cursor = answer["after"]
        if cursor is None:
            break
    for number in range(-(-biggest["size"] // 60)):
        by_number += [i["id"] for i in api.get(f"clusters/{biggest['id']}/images", params={"page": number}).json()[
            "images"]]
    assert walked == by_number and len(walked) == biggest["size"]
    for hostile in ("x:1", "nan:0", "inf:3", "-inf:3", "0.5:", ":", "0.5:99999999999999999999999"):
        assert api.get(f"clusters/{biggest['id']}/images", params={"after": hostile}).status_code == 400, hostile

    first = page["images"][0]
    record = api.get(f"images/{first['id']}", params={"k": 5}).json()
    hit = index.get(first["id"])
    assert record["path"] == hit.path and record["cluster"] == biggest["id"] and record["name"] == biggest["name"]
    assert record["topk"][0]["cluster"] == hit.cluster and len(record["neighbours"]) == 5
    assert first["id"] not in [n["id"] for n in record["neighbours"]]

    picture = api.get(f"images/{first['id']}/file")
    assert picture.headers["content-type"] == "image/png" and picture.headers["x-content-type-options"] == "nosniff"
    with Image.open(hit.abs_path) as original, Image.open(io.BytesIO(picture.content)) as served:
        assert served.size == original.size
    assert api.get("images/999999").status_code == 404
    assert api.get("clusters/999/images").status_code in (400, 404)


def test_search_by_id_upload_and_vector_agree_with_the_index(servers: dict) -> None:
    api, index = servers["open"], servers["ix"]
    model = OnnxModel(servers["model"], device="cpu")
    query = index.records(None, order_by="id", limit=3)[2]
    expected = [h.id for h in index.search_id(query.id, 6)]
    by_id = api.get(f"search/id/{query.id}", params={"k": 6}).json()
    assert [n["id"] for n in by_id["neighbours"]] == expected

    with open(query.abs_path, "rb") as handle:
        by_upload = api.post("search/upload", params={"k": 6}, files={"file": ("q.jpg", handle)}).json()
    assert [n["id"] for n in by_upload["neighbours"]] == [h.id for h in index.search_image(model, query.abs_path, 6)]
    probs = model.predict([query.abs_path])[0][0]
    assert by_upload["classes"][0]["cluster"] == int(probs.argmax())
    assert abs(by_upload["classes"][0]["probability"] - float(probs.max())) < 1e-4

    vector = index.vector(query.id).tolist()
    by_vector = api.post("search/vector", json={"vector": vector, "k": 6}).json()
    assert [n["id"] for n in by_vector["neighbours"]] == [h.id for h in index.search_vectors(np.array([vector]), 6)[0]]
    assert by_vector["neighbours"][0]["id"] == query.id  # an indexed vector finds itself first
    assert api.post("search/vector", json={"vector": vector[:-1], "k": 6}).status_code == 400
    nan_query = json.dumps({"vector": [float("nan")] * len(vector)})  # NaN is not JSON, but clients send it
    assert api.post("search/vector", content=nan_query, headers={"content-type": "application/json"}
                    ).status_code in (400, 422)
    bad = api.post("search/upload", files={"file": ("x.jpg", b"not an image")})
    assert bad.status_code == 400 and "image" in bad.json()["detail"]


def test_labels_follow_the_curation_in_json_and_csv(servers: dict) -> None:
    api, index = servers["open"], servers["ix"]
    before, after = [], -1
    while after is not None:  # pages by id, each after the last id of the one before
        answer = api.get("labels", params={"after": after, "limit": 7}).json()
        before += answer["labels"]
        after = answer["after"]
        assert after is None or after == answer["labels"][-1]["id"]
    assert len(before) == index.size and {r["path"] for r in before} == set(index.paths())
    assert [r["id"] for r in before] == sorted(r["id"] for r in before)
    as_csv = list(csv.DictReader(io.StringIO(api.get("labels", params={"format": "csv"}).text)))
    assert len(as_csv) == index.size
    assert api.get("labels", params={"format": "xml"}).status_code == 422


def test_auth_applies_and_openapi_describes_the_routes(servers: dict) -> None:
    url = servers["locked_url"]
    anonymous = httpx.Client(base_url=url, timeout=60)
    for route in ("api/v1/clusters", "api/v1/labels", "api/v1/images/0", "api/v1/images/0/file",
                  "api/v1/search/id/0", "api/v1/review"):
        assert anonymous.get(route).status_code == 401, route
    assert anonymous.post("api/v1/search/vector", json={"vector": [0.0]}).status_code == 401
    assert httpx.get(url + "api/v1/clusters", auth=(USER, "wrong"), timeout=60).status_code == 401
    assert httpx.get(url + "api/v1/clusters", auth=(USER, PASSWORD), timeout=60).status_code == 200
    session = httpx.Client(base_url=url, timeout=60)
    session.post("login", data={"username": USER, "password": PASSWORD})
    assert session.get("api/v1/clusters").status_code == 200  # the UI's login cookie works too
    for attempt in ("api/v1/images/..%2f..%2fetc%2fpasswd", "api/v1/images/-1/file", "api/v1/../../etc/passwd"):
        response = session.get(attempt)
        assert response.status_code in (404, 422) and b"root:" not in response.content, attempt
    spec = session.get("openapi.json").json()
    routes = {path for path in spec["paths"] if path.startswith("/api/v1/")}
    assert {"/api/v1/clusters", "/api/v1/search/upload", "/api/v1/search/vector",
            "/api/v1/search/id/{image_id}", "/api/v1/labels", "/api/v1/review"} <= routes


def test_review_route_pages_the_queue_most_likely_wrong_first_and_follows_the_curation(servers: dict) -> None:
    """The queue as the index scored it (score, then id), 60 a page; an image confirmed in the store (by
    another process, as a second app would) leaves it, and undo brings it back."""
    import sqlite3

    from twist_core.curate.curation import CurationStore
    from twist_core.index.metadata import meta_path

    api, index = servers["open"], servers["ix"]
    with sqlite3.connect(f"file:{meta_path(servers['index'])}?mode=ro", uri=True) as db:
        scored = db.execute("SELECT id, score, suggestion FROM review ORDER BY score DESC, id").fetchall()
    first, second = (api.get("review", params={"page": page}).json() for page in (0, 1))
    assert first["total"] == len(scored) == index.size and first["page_size"] == 60
    assert [i["id"] for i in first["images"] + second["images"]] == [row[0] for row in scored[:120]]
    assert [i["score"] for i in first["images"]] == [round(row[1], 6) for row in scored[:60]]
    top = first["images"][0]
    hit = index.get(top["id"])
    assert top["path"] == hit.path and top["cluster"] == hit.cluster and top["status"] == "predicted"
    assert {"confidence", "topk", "name", "score", "suggestion"} <= set(top)
    suggested = [i for i in first["images"] if i["suggestion"]]
    assert all(i["suggestion"]["cluster"] != i["cluster"] and i["suggestion"]["name"] for i in suggested)
    assert api.get("review", params={"page": -1}).status_code == 422

    store = CurationStore(servers["open_state"] / "curation.sqlite", meta_path(servers["index"]), [])
    try:
        store.confirm([top["id"]])
        after = api.get("review").json()
        assert after["total"] == first["total"] - 1 and top["id"] not in [i["id"] for i in after["images"]]
        store.undo()
        assert api.get("review").json()["images"][0]["id"] == top["id"]
    finally:
        store.close()
