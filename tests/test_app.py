"""The web app over HTTP: every endpoint through gradio_client against a live server on loopback.

Results are checked against the index and model used directly; file-access refusals are real HTTP requests.
"""

from __future__ import annotations

import contextlib
import csv
import inspect
import json
import re
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import REPO, loneliest_map_point, start_app_server, stop_app_server
from gradio_client import Client, handle_file
from PIL import Image

from app.main import AppConfig, AppStartError, parse_auth, resolve_defaults
from app.projection import MAP_HEIGHT, MAP_WIDTH
from app.workspace import DISPLAY_SIDE
from twist_core.curate.curation import CurationStore
from twist_core.deploy.infer import OnnxModel
from twist_core.index.image_index import IndexReader
from twist_core.index.metadata import read_manifest
from twist_core.label.tree import folder_names
from twist_core.layout import META_FILE

MAX_PIXELS = 1_000_000


@pytest.fixture(scope="module")
def server(app_bundle: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    state = tmp_path_factory.mktemp("app_state") / "state"
    process, url = start_app_server(app_bundle, state, "--max-upload-mb", "1", "--max-pixels", str(MAX_PIXELS))
    try:
        yield {"url": url, "state": state, **app_bundle}
    finally:
        stop_app_server(process)


@pytest.fixture(scope="module")
def client(server: dict) -> Client:
    return Client(server["url"], verbose=False)


@pytest.fixture(scope="module")
def index(server: dict) -> Iterator[IndexReader]:
    opened = IndexReader.open(server["index"], "cpu")
    yield opened
    opened.close()


@pytest.fixture(scope="module")
def model(server: dict) -> OnnxModel:
    return OnnxModel(server["model"], device="cpu")


def store_of(server: dict, model: OnnxModel) -> CurationStore:
    """A second, independent reader of the curation store (like a restarted server or another tab)."""
    manifest = read_manifest(server["index"])
    return CurationStore(server["state"] / "curation.sqlite", server["index"] / manifest["dir"] / META_FILE,
                         model.class_names)


def ids_of(gallery: list[dict]) -> list[int]:
    return [int(re.match(r"#(\d+)", item["caption"]).group(1)) for item in gallery]


def confidences_of(gallery: list[dict]) -> list[float]:
    return [float(item["caption"].rsplit("· ", 1)[1]) for item in gallery]


def read_csv(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def largest_cluster(index: IndexReader) -> dict:
    return max(index.cluster_summary(), key=lambda c: (c["size"], -c["cluster"]))


def test_overview_shows_every_cluster_and_the_dataset(client: Client, index: IndexReader) -> None:
    cards, table, summary = client.predict("size", api_name="/overview")
    expected = sorted(index.cluster_summary(), key=lambda c: (-c["size"], c["cluster"]))
    assert [int(c["caption"].split(" · ")[0]) for c in cards] == [c["cluster"] for c in expected]
    assert [row[2] for row in table["data"]] == [c["size"] for c in expected]
    assert f"{index.size:,} images" in summary and "skipped files: 0" in summary
    for card in cards:
        assert Path(card["image"]).is_file()
    _, by_confidence, _ = client.predict("confidence", api_name="/overview")
    means = [row[3] for row in by_confidence["data"]]
    assert means == sorted(means, reverse=True)


def test_cluster_pages_are_paged_sorted_and_filtered_on_the_server(client: Client, index: IndexReader,
                                                                   server: dict) -> None:
    biggest = largest_cluster(index)
    gallery, info, page = client.predict(biggest["cluster"], 0, False, 0, 1, api_name="/open_cluster")
    expected = index.records(biggest["cluster"], limit=60)
    assert ids_of(gallery) == [h.id for h in expected] and page == 0
    assert f"{biggest['size']:,} images" in info
    thumbs = [server["state"] / "thumbnails" / f"{i}.jpg" for i in ids_of(gallery)]
    stamps = [t.stat().st_mtime_ns for t in thumbs]
    with Image.open(thumbs[0]) as thumb:
        assert max(thumb.size) == 160  # a 32 px image is enlarged (sharply) to the thumbnail size
    lowest, _, _ = client.predict(biggest["cluster"], 0, True, 0, 1, api_name="/open_cluster")
    assert ids_of(lowest) == [h.id for h in index.records(biggest["cluster"], descending=False, limit=60)]
    assert confidences_of(lowest) == sorted(confidences_of(lowest))
    again, _, _ = client.predict(biggest["cluster"], 0, False, 0, 1, api_name="/open_cluster")
    assert ids_of(again) == ids_of(gallery)
    assert [t.stat().st_mtime_ns for t in thumbs] == stamps, "thumbnails must be made once, not per request"
    middle = float(np.median([h.confidence for h in index.records(biggest["cluster"], limit=10_000)]))
    filtered, info, _ = client.predict(biggest["cluster"], 0, False, middle, 1, api_name="/open_cluster")
    wanted = index.records(biggest["cluster"], limit=10_000, min_conf=middle)
    assert ids_of(filtered) == [h.id for h in wanted][:60] and f"{len(wanted):,} images" in info
    if biggest["size"] > 60:
        second, _, page = client.predict(biggest["cluster"], 1, False, 0, 1, api_name="/open_cluster")
        assert page == 1 and ids_of(second) == [h.id for h in index.records(biggest["cluster"], offset=60)]
    with pytest.raises(Exception, match="there is no cluster 99"):
        client.predict(99, 0, False, 0, 1, api_name="/open_cluster")


def test_selecting_an_image_shows_path_distribution_and_neighbours(client: Client, index: IndexReader,
                                                                   model: OnnxModel) -> None:
    hit = index.records(largest_cluster(index)["cluster"], limit=1)[0]
    image, details, plot, neighbours = client.predict(hit.id, api_name="/select_image")
    assert hit.path in details  # the picture is the image re-encoded by the app, pixel for pixel...
    with Image.open(image) as shown, Image.open(hit.abs_path) as original:
        factor = DISPLAY_SIDE // max(original.size)  # ...enlarged, as it is small, by nearest-neighbour sampling
        assert factor > 1 and shown.size == (original.width * factor, original.height * factor)
        sharp = original.convert("RGB").resize(shown.size, Image.Resampling.NEAREST)
        assert np.array_equal(np.asarray(shown.convert("RGB")), np.asarray(sharp))
    probs = model.predict([hit.abs_path])[0][0]
    values = [row[1] for row in plot["data"]]
    assert values == sorted(values, reverse=True) and abs(values[0] - float(probs.max())) < 1e-3
    assert plot["data"][0][0].startswith(f"{int(probs.argmax())} ")
    assert ids_of(neighbours) == [h.id for h in index.search_id(hit.id, 12)]


def test_search_by_upload_matches_the_index(client: Client, index: IndexReader, model: OnnxModel) -> None:
    hit = index.records(None, order_by="id", limit=1)[0]
    _, neighbours = client.predict(handle_file(str(hit.abs_path)), 8, api_name="/search_upload")
    expected = index.search_image(model, hit.abs_path, 8)
    assert ids_of(neighbours) == [h.id for h in expected]
    assert float(neighbours[0]["caption"].rsplit("sim ", 1)[1]) > 0.99
    _, from_id = client.predict(hit.id, 5, api_name="/search_id")
    assert ids_of(from_id) == [h.id for h in index.search_id(hit.id, 5)]


def test_bad_uploads_get_a_sentence(client: Client, tmp_path: Path) -> None:
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image")
    with pytest.raises(Exception, match="cannot be used as an image") as caught:
        client.predict(handle_file(str(text)), 5, api_name="/search_upload")
    assert "Traceback" not in str(caught.value)
    huge = tmp_path / "huge.png"
    Image.new("RGB", (1200, 1000), (10, 20, 30)).save(huge)  # 1.2 MP > the 1 MP limit, a tiny file
    with pytest.raises(Exception, match="exceeds the limit"):
        client.predict(handle_file(str(huge)), 5, api_name="/search_upload")
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (800, 800, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > 1 << 20
    with pytest.raises(ValueError, match="exceeds the maximum file size"):  # the app's --max-upload-mb, which the
        # client reads from the app's config and checks before it sends anything
        client.predict(handle_file(str(big)), 5, api_name="/search_upload")


def test_curation_is_stored_shared_and_undoable(server: dict, client: Client, index: IndexReader,
                                                model: OnnxModel) -> None:
    sizes = dict.fromkeys(range(model.n_classes), 0) | {c["cluster"]: c["size"] for c in index.cluster_summary()}
    big = max(sizes, key=lambda c: (sizes[c], -c))
    other = min(c for c in sizes if c != big)  # may be empty: the tiny model can put everything in one cluster
    status, *_ = client.predict(big, "Mostly things", api_name="/rename_cluster")
    assert "Mostly things" in status
    second_tab = Client(server["url"], verbose=False)
    _, table, _ = second_tab.predict("size", api_name="/overview")
    assert "Mostly things" in [row[1] for row in table["data"]]
    with pytest.raises(Exception, match="already called"):
        client.predict(other, "mostly THINGS", api_name="/rename_cluster")

    moved = [h.id for h in index.records(big, limit=3)]
    shown, count = client.predict(f"{moved[2]}, {moved[0]} 999999 {moved[1]}, {moved[0]}",
                                        api_name="/show_selection")
    assert ids_of(shown) == [moved[2], moved[0], moved[1]] and count == "3 selected"  # unknown id and repeat dropped
    client.predict(", ".join(map(str, moved)), other, api_name="/move_images")
    excluded = index.records(big, offset=3, limit=2)
    client.predict(" ".join(str(h.id) for h in excluded), api_name="/exclude_images")
    store = store_of(server, model)
    records = store.records(moved + [h.id for h in excluded])
    assert [records[i].label for i in moved] == [other] * 3 and {records[i].status for i in moved} == {"moved"}
    assert all(records[h.id].status == "excluded" for h in excluded)
    assert store.count(big) == sizes[big] - 5
    gallery, _, _ = client.predict(other, 0, False, 0, 1, api_name="/open_cluster")
    assert set(moved) <= set(ids_of(gallery))

    client.predict([other], big, api_name="/merge_clusters")
    assert store.count(big) == sizes[big] + sizes[other] - 2
    assert store.count(other) == 0
    status, *_ = client.predict(api_name="/undo")
    assert "undone: merged" in status
    assert store.count(other) == sizes[other] + 3
    client.predict(api_name="/undo")
    assert store.records([excluded[0].id])[excluded[0].id].status == "predicted"
    store.close()


def test_exports_follow_the_curation(server: dict, client: Client, index: IndexReader, model: OnnxModel,
                                     tmp_path: Path) -> None:
    store = store_of(server, model)
    names = store.names()
    expected = {r.path: r for r in store.iter_records()}
    rows = read_csv(client.predict(api_name="/export_csv"))
    assert len(rows) == index.size
    for row in rows:
        r = expected[row["path"]]
        assert row["status"] == r.status and row["label_name"] == ("" if r.status == "excluded" else names[r.label])
    labelled = [r for r in expected.values() if r.status != "excluded"]
    with zipfile.ZipFile(client.predict(api_name="/export_zip")) as archive:
        entries = [n for n in archive.namelist() if not n.endswith("/")]
    assert len(entries) == len(labelled)
    assert {n.split("/")[0] for n in entries} <= set(folder_names([names[c] for c in sorted(names)]))
    tasks_path, config = client.predict("/data/local-files/?d=", api_name="/export_label_studio")
    tasks = json.loads(Path(tasks_path).read_text())
    assert len(tasks) == len(labelled) and '<Choices name="label" toName="image"' in config
    task = tasks[0]
    record = store.records([task["data"]["twist_id"]])[task["data"]["twist_id"]]
    prediction = task["predictions"][0]
    assert prediction["result"][0]["value"]["choices"] == [names[record.label]]
    assert 0 < prediction["score"] <= 1 and task["data"]["image"].startswith("/data/local-files/?d=")
    message = client.predict(str(tmp_path / "tree"), "symlink", api_name="/export_tree")
    placed = [p for p in (tmp_path / "tree").rglob("*") if p.is_symlink()]
    assert f"{len(labelled):,} images" in message and len(placed) == len(labelled)
    with pytest.raises(Exception, match="absolute folder"):
        client.predict("relative/tree", "symlink", api_name="/export_tree")
    store.close()


def test_map_and_batch(client: Client, index: IndexReader, model: OnnxModel, server: dict, tmp_path: Path) -> None:
    points = client.predict(api_name="/projection")
    assert len(points) == index.size and (server["state"] / "projection-gen1.npz").is_file()
    assert {p["id"] for p in points} == {r.id for r in index.records(None, order_by="id", limit=index.size)}
    picture = np.asarray(Image.open(client.predict(api_name="/map_picture")))
    assert picture.shape[:2] == (MAP_HEIGHT, MAP_WIDTH)
    loneliest, x, y = loneliest_map_point(np.array([[p["x"], p["y"]] for p in points]))
    assert picture[round(y), round(x)].min() < 240  # the point is drawn where the geometry says
    assert client.predict(x + 1, y - 1, api_name="/map_point") == points[loneliest]["id"]
    with pytest.raises(Exception, match="no image there"):
        client.predict(MAP_WIDTH - 2, 2, api_name="/map_point")  # the legend's corner, far from any point

    hits = index.records(None, order_by="id", limit=3)
    bundle = tmp_path / "more.zip"
    with zipfile.ZipFile(bundle, "w") as archive:
        archive.write(hits[1].abs_path, "inside/one.png")
        archive.writestr("inside/broken.jpg", b"not an image")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG nonsense")
    out, _ = client.predict([handle_file(str(hits[0].abs_path)), handle_file(str(bundle)),
                             handle_file(str(broken))], api_name="/batch_label")
    rows = read_csv(out)
    assert [r["file"] for r in rows] == [hits[0].abs_path.name, "inside/one.png", "inside/broken.jpg", "broken.png"]
    probs = model.predict([hits[0].abs_path, hits[1].abs_path])[0]
    assert [int(rows[0]["cluster"]), int(rows[1]["cluster"])] == probs.argmax(axis=1).tolist()
    assert rows[2]["error"] and rows[3]["error"] and not rows[0]["error"]


def progress_messages(url: str, api_name: str, data: list) -> list[dict]:
    """Run an endpoint through Gradio's own queue protocol (as the browser does) and collect what it streams
    back: its progress messages, then the completion."""
    dependencies = httpx.get(url + "config", timeout=60).json()["dependencies"]
    fn_index = next(d["id"] for d in dependencies if d.get("api_name") == api_name)
    session = f"progress-{api_name}"
    joined = httpx.post(url + "gradio_api/queue/join", timeout=60,
                        json={"data": data, "fn_index": fn_index, "session_hash": session, "event_data": None,
                              "trigger_id": None})
    assert joined.status_code == 200, joined.text
    messages = []
    with httpx.stream("GET", url + "gradio_api/queue/data", params={"session_hash": session}, timeout=120) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                messages.append(json.loads(line[5:]))
                if messages[-1].get("msg") == "process_completed":
                    break
    return messages


def test_batch_labelling_shows_its_progress_in_the_browser_protocol(server: dict) -> None:
    pictures = sorted(p for p in server["images"].rglob("*") if p.is_file())
    with contextlib.ExitStack() as files:
        uploads = [("files", (p.name, files.enter_context(open(p, "rb")))) for p in pictures]
        paths = httpx.post(server["url"] + "gradio_api/upload", files=uploads, timeout=120).json()
    batch = [{"path": path, "orig_name": p.name, "meta": {"_type": "gradio.FileData"}}
             for path, p in zip(paths, pictures, strict=True)]
    messages = progress_messages(server["url"], "batch_label", [batch])
    assert messages[-1]["msg"] == "process_completed" and messages[-1]["success"], messages[-1]
    steps = [m["progress_data"][0] for m in messages if m.get("msg") == "progress"]
    assert steps and all(s["unit"] == "images" and s["desc"] == "labelling" for s in steps), messages
    done = [s["index"] for s in steps]  # Gradio sends the latest state every so often, not every call
    assert done == sorted(done) and 0 < done[-1] <= steps[-1]["length"] == len(pictures)


def test_only_images_the_app_made_are_served(server: dict, index: IndexReader) -> None:
    base = server["url"] + "gradio_api/file="
    hit = index.records(None, order_by="id", limit=1)[0]
    shown = Client(server["url"], verbose=False, download_files=False).predict(hit.id, api_name="/select_image")[0]
    allowed = httpx.get(shown["url"])
    assert allowed.status_code == 200 and allowed.headers["content-type"] == "image/png"  # the check can see a file
    image = hit.abs_path  # the dataset itself is never served: its pictures leave the server re-encoded
    secret_files = [image, Path("/etc/passwd"), server["state"] / "curation.sqlite", server["model"],
                    REPO / "pyproject.toml"]
    attempts = [base + str(p) for p in secret_files]
    attempts += [base + str(image.parent) + "/../" * 12 + "etc/passwd",
                 base + str(server["state"] / "thumbnails") + "/../curation.sqlite",
                 base + "%2e%2e/" * 12 + "etc/passwd", base + "..%2f" * 12 + "etc%2fpasswd",
                 server["url"] + "file=/etc/passwd", server["url"] + "gradio_api/file=../../../../etc/passwd"]
    for url in attempts:
        response = httpx.get(url)
        assert response.status_code in (400, 403, 404), (url, response.status_code)
        assert b"root:" not in response.content and b"SQLite format" not in response.content


def test_twenty_concurrent_searches_are_all_answered_correctly(client: Client, index: IndexReader,
                                                               model: OnnxModel) -> None:
    hits = index.records(None, order_by="id", limit=20)
    expected = {h.id: [n.id for n in index.search_image(model, h.abs_path, 6)] for h in hits}

    def search(hit) -> tuple[int, list[int]]:
        _, neighbours = client.predict(handle_file(str(hit.abs_path)), 6, api_name="/search_upload")
        return hit.id, ids_of(neighbours)

    with ThreadPoolExecutor(20) as pool:
        answers = dict(pool.map(search, hits))
    assert answers == expected


def test_startup_problems_are_one_line_and_exit_2(tmp_path: Path, app_bundle: dict[str, Path]) -> None:
    for args in (["--model", str(tmp_path / "missing.onnx"), "--index", str(app_bundle["index"])],
                 ["--model", str(app_bundle["model"]), "--index", str(tmp_path / "no-index")],
                 []):
        result = subprocess.run([sys.executable, "-m", "twist_core.cli", "app", *args], cwd=tmp_path,
                                capture_output=True, text=True, timeout=120,
                                env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin",
                                     "TWIST_DEMO_DIR": str(tmp_path / "no-demo")})  # not the shipped demo
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("twist app: error:") and result.stderr.count("\n") == 1, result.stderr
        assert "Traceback" not in result.stderr
    with pytest.raises(AppStartError, match="USER:PASSWORD"):
        parse_auth("no-colon")
    assert parse_auth("ann:secret") == [("ann", "secret")]
    assert AppConfig().host == "127.0.0.1"
    with pytest.raises(AppStartError, match="no demo model"):
        resolve_defaults(AppConfig(), demo=tmp_path / "models" / "demo")
    with pytest.raises(AppStartError, match="--index is needed"):
        resolve_defaults(AppConfig(model=str(tmp_path / "other.onnx")), demo=tmp_path)


def test_batch_labelling_and_the_zip_report_their_progress(app_bundle: dict[str, Path], tmp_path: Path) -> None:
    """The workspace reports (done, total) as it goes; the UI's handlers take Gradio's progress tracker."""
    import gradio as gr

    from app.ui import build_ui
    from app.workspace import BATCH_CHUNK, Workspace

    pictures = sorted(p for p in app_bundle["images"].rglob("*") if p.is_file())[:BATCH_CHUNK + 6]
    workspace = Workspace(app_bundle["model"], app_bundle["index"], tmp_path / "state")
    try:
        calls: list[tuple[int, int]] = []
        _, rows = workspace.batch_label(pictures, lambda done, total: calls.append((done, total)))
        assert len(rows) == len(pictures) and calls == [(BATCH_CHUNK, len(pictures)), (len(pictures),) * 2]
        calls.clear()
        with zipfile.ZipFile(workspace.export_zip(lambda done, total: calls.append((done, total)))) as archive:
            written = len([n for n in archive.namelist() if not n.endswith("/")])
        assert calls[-1] == (written, written) and [d for d, _ in calls] == sorted({d for d, _ in calls})
        handlers = {fn.api_name: fn.fn for fn in build_ui(workspace).fns.values()}
    finally:
        workspace.close()
    for name in ("batch_label", "export_zip"):
        assert isinstance(inspect.signature(handlers[name]).parameters["progress"].default, gr.Progress), name


def test_closing_the_workspace_stops_the_thumbnail_warm_up_before_closing_its_stores(
        app_bundle: dict[str, Path], tmp_path: Path) -> None:
    """Ctrl-C right after the start: the warm-up thread must not read a store that close() has closed."""
    from app.workspace import PAGE_SIZE, Workspace

    failures: list[BaseException | None] = []
    previous = threading.excepthook
    threading.excepthook = lambda args: failures.append(args.exc_value)
    try:
        workspace = Workspace(app_bundle["model"], app_bundle["index"], tmp_path / "state")
        full_warm_up = sum(min(c["size"], PAGE_SIZE) for c in workspace.store.summary())
        thread = workspace.warm_thumbnails()
        workspace.close()
        thread.join(timeout=30)
    finally:
        threading.excepthook = previous
    assert not thread.is_alive() and failures == []
    assert len(list(workspace.thumbnails.folder.glob("*.jpg"))) < full_warm_up  # it stopped early, not finished


def test_thumbnails_made_another_way_are_remade(tmp_path: Path) -> None:
    """A state folder from an older release (its record holds only the index uid) or from another thumbnail size
    must not keep serving those thumbnails: a 16 px image was shown as a blurry 16 px file before recipe 2."""
    from app.thumbnails import OWNER_FILE, ThumbnailCache

    source = tmp_path / "small.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(source)
    folder = tmp_path / "thumbnails"
    folder.mkdir()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(folder / "0.jpg")  # what the old recipe made
    (folder / OWNER_FILE).write_text("uid-a\n")
    cache = ThumbnailCache(folder, size=64, owner="uid-a")
    with Image.open(cache.path(0, source)) as made:
        assert made.size == (64, 64)  # 16 px enlarged 4x, sharp
    with Image.open(ThumbnailCache(folder, size=64, owner="uid-a").path(0, source)) as kept:
        assert kept.size == (64, 64)
    kept_at = (folder / "0.jpg").stat().st_mtime_ns
    assert ThumbnailCache(folder, size=64, owner="uid-a").path(0, source).stat().st_mtime_ns == kept_at
    with Image.open(ThumbnailCache(folder, size=160, owner="uid-a").path(0, source)) as bigger:
        assert bigger.size == (160, 160)


def test_the_class_chart_holds_real_shares_under_short_names() -> None:
    """A photo model's chart was one bar among nine of 0.0000; long cluster names ran into each other."""
    from types import SimpleNamespace

    from app.views.shared import LABEL_CHARS, distribution

    names = {0: "motorbikes", 1: "a sea turtle photographed from above on a reef", 2: "faces", 3: "leopards"}
    chart = distribution(SimpleNamespace(names=lambda: names), np.array([0.004, 0.95, 0.04, 0.006]))
    assert chart["cluster"].tolist() == ["1 a sea turtle phot…", "2 faces"]
    assert all(len(label.split(" ", 1)[1]) <= LABEL_CHARS for label in chart["cluster"])
    assert chart["probability"].tolist() == [0.95, 0.04]
