"""Issue 36, item 10: the index's files damaged under a serving app, then mended, without a restart.

A live ``twist app`` on loopback serves a copy of an index; its ``manifest.json`` is overwritten with garbage,
or its ``meta.sqlite`` is truncated, while it serves. Requests must go on being answered from the generation
that is open, the log and the page must say what is wrong, and once the files are good again the app must
serve them (the restored file, or a newer generation) with no restart.
"""

from __future__ import annotations

import html
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import start_app_server, stop_app_server
from gradio_client import Client

from twist_core.index.metadata import read_manifest
from twist_core.layout import MANIFEST, META_FILE


@pytest.fixture(scope="module")
def serving(app_bundle: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The app on a copy of the bundle's index (damaged here, never the shared one); each test leaves it whole."""
    base = tmp_path_factory.mktemp("damaged_index")
    index = base / "index"
    shutil.copytree(app_bundle["index"], index)
    state = base / "state"
    process, url = start_app_server({"model": app_bundle["model"], "index": index}, state)
    try:
        yield {"url": url, "index": index, "log": base / "state-server.log", "process": process,
               "before": clusters(url)}
    finally:
        stop_app_server(process)


def clusters(url: str) -> list[dict]:
    response = httpx.get(url + "api/v1/clusters", timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def overview(url: str) -> str:
    return Client(url, verbose=False).predict("size", api_name="/overview")[2]


def warning(url: str) -> str:
    """The warning line at the top of a freshly loaded page."""
    return Client(url, verbose=False).predict(api_name="/index_warning")


def replace_with(path: Path, content: bytes) -> None:
    """Put a new file in place of ``path`` (a new inode), as a copy tool or a restore from backup does."""
    fresh = path.with_name(path.name + ".restoring")
    fresh.write_bytes(content)
    fresh.replace(path)


def manifest_folder(manifest: Path) -> Path:
    """The generation folder a manifest names (one that does not exist when it names none)."""
    try:
        return manifest.parent / str(json.loads(manifest.read_text())["dir"])
    except (ValueError, KeyError, TypeError):
        return manifest.parent / "none"


def meta_of(index: Path) -> Path:
    return index / read_manifest(index)["dir"] / META_FILE


def test_a_garbage_manifest_leaves_the_open_generation_served_and_said(serving: dict) -> None:
    url, index = serving["url"], serving["index"]
    manifest = index / MANIFEST
    good = json.loads(manifest.read_text())
    manifest.write_bytes(b"\x00garbage{not json")
    try:
        for _ in range(3):  # every route still answers, from the generation open
            assert clusters(url) == serving["before"]
            assert "non-empty clusters" in overview(url)
        shown = warning(url)
        assert shown.startswith("**Warning:**") and "manifest.json is damaged" in html.unescape(shown), shown
        log = serving["log"].read_text()
        assert log.count("manifest.json is damaged") == 1 and "still serving generation 1" in log  # said once
        assert "Traceback" not in log, log[-3000:]

        # mended as a newer generation (a copy of the open one): served without a restart, the warning gone
        generation = good["generation"] + 1
        shutil.copytree(index / good["dir"], index / f"gen-{generation:06d}")
        manifest.write_text(json.dumps({"generation": generation, "dir": f"gen-{generation:06d}"}))
        assert clusters(url) == serving["before"]
        assert warning(url) == ""
        log = serving["log"].read_text()
        assert f"now serving generation {generation}" in log and "whole again" in log, log[-3000:]
    finally:  # the next tests need a readable index, whatever happened here
        if not manifest_folder(manifest).is_dir():
            manifest.write_text(json.dumps(good))


def test_a_metadata_file_replaced_by_a_truncated_one_is_said_and_the_open_one_served(serving: dict) -> None:
    url, meta = serving["url"], meta_of(serving["index"])
    good = meta.read_bytes()
    try:
        replace_with(meta, good[:len(good) // 3])
        for _ in range(3):
            assert clusters(url) == serving["before"]
            assert "non-empty clusters" in overview(url)
        shown = html.unescape(warning(url))
        assert f"{meta} is damaged" in shown and "still serving generation" in shown, shown
        assert serving["log"].read_text().count(f"{meta} is damaged") == 1

        replace_with(meta, good)
        assert clusters(url) == serving["before"]
        assert warning(url) == ""
    finally:
        replace_with(meta, good)


def test_a_metadata_file_truncated_in_place_is_said_and_served_again_once_restored(serving: dict) -> None:
    """Truncated in place, the open file itself is cut: pages fail with one line until a restore by a new file
    (which the app used to ignore: 500s until a restart)."""
    url, meta = serving["url"], meta_of(serving["index"])
    good = meta.read_bytes()
    assert warning(url) == ""  # the app has followed the file as it is now: the one cut below is the one open
    try:
        with open(meta, "r+b") as handle:
            handle.truncate(len(good) // 3)
        with pytest.raises(Exception, match="cannot be read") as refused:
            overview(url)
        assert "\n" not in str(refused.value)
        assert f"{meta} is damaged" in html.unescape(warning(url))
        answer = httpx.get(url + "api/v1/clusters", timeout=60)  # the API says the same, never a bare 500
        assert answer.status_code == 503 and "cannot be read" in answer.json()["detail"], answer.text

        replace_with(meta, good)
        assert clusters(url) == serving["before"]
        assert "non-empty clusters" in overview(url) and warning(url) == ""
        assert serving["process"].poll() is None
    finally:
        replace_with(meta, good)
