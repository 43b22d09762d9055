"""The app keeps up with its index: ``twist index --update`` run while the app serves is picked up at once.

A real ``twist app`` on loopback serves a small index; an image is moved through the UI's API; new images are
added to the folder and ``twist index --update`` (a separate process) commits a new generation. The very next
requests (JSON API and Gradio) must show the new images, search them, map them, and still apply the move.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from conftest import REPO, start_app_server, stop_app_server
from gradio_client import Client

from twist_core.index.build import IndexConfig, build_index
from twist_core.index.delta import step_files
from twist_core.index.image_index import IndexReader, IndexWriter
from twist_core.index.metadata import meta_path

FIRST, ADDED = 8, 5  # images per class at first, images added by the update


def keep_asking(url: str, image_id: int, done: threading.Event) -> list[int]:
    """Status codes of searches and cluster lists asked for until ``done`` (during the update)."""
    statuses = []
    with httpx.Client(base_url=url + "api/v1/", timeout=60) as api:
        while not done.is_set() or not statuses:
            statuses.append(api.get(f"search/id/{image_id}", params={"k": 3}).status_code)
            statuses.append(api.get("clusters").status_code)
    return statuses


def test_an_index_update_is_picked_up_without_a_restart_and_keeps_the_curation(
        app_bundle: dict[str, Path], shapes_folder: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    for label in ("discs", "stripes"):
        (images / label).mkdir(parents=True)
        for picture in sorted((shapes_folder / label).iterdir())[:FIRST]:
            shutil.copy(picture, images / label / picture.name)
    index = build_index(IndexConfig(source=str(images), model=str(app_bundle["model"]), out=str(tmp_path / "ix"),
                                    device="cpu"))
    process, url = start_app_server({"model": app_bundle["model"], "index": index}, tmp_path / "state")
    try:
        api, client = httpx.Client(base_url=url + "api/v1/", timeout=60), Client(url, verbose=False)
        before = api.get("labels", params={"limit": 10_000}).json()["labels"]
        assert len(before) == 2 * FIRST
        moved = before[0]
        target = next(c for c in range(4) if c != moved["cluster"])
        client.predict(str(moved["id"]), target, api_name="/move_images")
        assert len(client.predict(api_name="/projection")) == 2 * FIRST  # the map of the first generation

        (images / "later").mkdir()
        for picture in sorted((shapes_folder / "stripes").iterdir())[-ADDED:]:
            shutil.copy(picture, images / "later" / picture.name)
        with ThreadPoolExecutor(1) as pool:  # requests keep coming while the update commits
            done = threading.Event()
            answers = pool.submit(keep_asking, url, moved["id"], done)
            update = subprocess.run([sys.executable, "-m", "twist_core.cli", "index", "--update", "--out",
                                     str(index), "--device", "cpu"], cwd=REPO, capture_output=True, text=True,
                                    timeout=300)
            done.set()
            statuses = answers.result()
        assert update.returncode == 0 and f"added {ADDED}" in update.stdout, update.stderr
        assert statuses and set(statuses) == {200}, statuses

        after = {r["path"]: r for r in api.get("labels", params={"limit": 10_000}).json()["labels"]}
        new = [r for path, r in after.items() if path.startswith("later/")]
        assert len(after) == 2 * FIRST + ADDED and len(new) == ADDED
        assert sum(c["size"] for c in api.get("clusters").json()) == 2 * FIRST + ADDED
        assert after[moved["path"]]["id"] == moved["id"], "ids stay stable across an update"
        assert after[moved["path"]]["cluster"] == target and after[moved["path"]]["status"] == "moved"
        found = api.get(f"search/id/{new[0]['id']}", params={"k": 3}).json()["neighbours"]
        updated = IndexReader.open(index, "cpu")
        assert [n["id"] for n in found] == [h.id for h in updated.search_id(new[0]["id"], 3)]  # new vectors
        updated.close()
        _, _, summary = client.predict("size", api_name="/overview")
        assert f"{2 * FIRST + ADDED:,} images" in summary
        assert {p["id"] for p in client.predict(api_name="/projection")} == {r["id"] for r in after.values()}
    finally:
        stop_app_server(process)


def test_a_request_holding_a_generation_survives_two_updates_and_the_old_one_is_released_after(
        app_bundle: dict[str, Path], tmp_path: Path) -> None:
    """A slow request (an export, a batch) keeps the generation it started with while updates commit."""
    import gc
    import weakref

    from app.workspace import Workspace

    index_dir = tmp_path / "index"
    shutil.copytree(app_bundle["index"], index_dir)
    ws = Workspace(app_bundle["model"], index_dir, state_dir=tmp_path / "state")
    try:
        opened = ws._served.index
        held = ws.index  # what a request in flight holds
        assert held is opened  # the index is loaded once at start (the first access used to load it again)
        del opened
        first = held.generation
        kept = held.get(0).id
        for gone in (1, 2):  # two updates commit, each seen by another request
            writer = IndexWriter.open(index_dir, "cpu")
            writer.remove([gone])
            writer.close()
            assert ws.index.generation > first
        assert ws.index.size == held.size - 2
        assert len(step_files(meta_path(index_dir).parent)) == 2  # both were steps beside the base, read as one
        kept_sizes = {c["cluster"]: c["size"] for c in ws.store.summary()}  # the new generation's derived tables
        assert kept_sizes == {c["cluster"]: c["size"] for c in ws.index.cluster_summary()}
        assert held.get(kept).id == kept and held.search_id(kept, 3)  # the request in flight finishes
        released = weakref.ref(held)
        del held
        gc.collect()
        assert released() is None, "a generation no request holds any more is let go"
    finally:
        ws.close()
