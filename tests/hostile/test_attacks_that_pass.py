"""Attacks that the app already withstood when they were first tried; kept here so they stay withstood.

Each test is a real attempt against a live ``twist app --auth`` on loopback: requests without a login,
path traversal in many encodings, symlink escapes, oversized uploads, decompression bombs, and script in a
cluster name rendered by a real browser. (Kill -9 of ``twist label`` at many moments is kept in
tests/test_label.py::test_kill_and_resume_gives_the_uninterrupted_table.)
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import start_app_server, stop_app_server
from gradio_client import Client, handle_file
from PIL import Image

from twist_core.index.image_index import IndexReader

USER, PASSWORD = "ann", "correct horse battery staple"
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def guarded(app_bundle: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The app behind --auth, with escape attempts planted in the dataset folder (removed afterwards)."""
    images = app_bundle["images"]
    planted = [images / "escape.jpg", images / "escape_dir"]
    os.symlink("/etc/passwd", planted[0])
    os.symlink("/etc", planted[1])
    state = tmp_path_factory.mktemp("guarded_state") / "state"
    auth_file = state.parent / "auth.txt"
    auth_file.write_text(f"{USER}:{PASSWORD}\n")
    process, url = start_app_server(app_bundle, state, "--auth", str(auth_file), "--max-upload-mb", "1",
                                    "--max-pixels", "4000000")
    try:
        yield {"url": url, "state": state, "process": process, **app_bundle}
    finally:
        stop_app_server(process)
        for path in planted:
            path.unlink()


def logged_in(url: str) -> httpx.Client:
    session = httpx.Client(base_url=url, timeout=60)
    response = session.post("login", data={"username": USER, "password": PASSWORD})
    assert response.status_code in (200, 302, 303), response.text
    return session


def test_every_route_needs_the_login(guarded: dict) -> None:
    index = IndexReader.open(guarded["index"], "cpu")
    image = index.records(None, order_by="id", limit=1)[0].abs_path
    index.close()
    routes = ["config", "gradio_api/info", f"gradio_api/file={image}", "gradio_api/queue/status",
              "gradio_api/call/overview", "gradio_api/upload"]
    anonymous = httpx.Client(base_url=guarded["url"], timeout=60)
    for route in routes:
        method = anonymous.post if route.endswith(("upload", "overview")) else anonymous.get
        response = method(route)
        assert response.status_code in (401, 403, 404, 405), (route, response.status_code)
        assert image.read_bytes()[:64] not in response.content
    with pytest.raises(Exception):  # noqa: B017 (gradio_client raises its own error types for a refused login)
        Client(guarded["url"], auth=(USER, "wrong"), verbose=False)
    client = Client(guarded["url"], auth=(USER, PASSWORD), verbose=False)
    assert client.predict("size", api_name="/overview")  # the right login works for the API too


def test_traversal_and_symlink_escapes_are_refused_after_login(guarded: dict) -> None:
    session = logged_in(guarded["url"])
    images = guarded["images"]
    base = "gradio_api/file="
    attempts = [base + str(images / "escape.jpg"), base + str(images / "escape_dir" / "passwd"),
                base + str(images) + "/%2e%2e" * 12 + "/etc/passwd",
                base + str(images) + "/%252e%252e" * 12 + "/etc/passwd",
                base + str(images) + "/..%5c" * 12 + "etc/passwd",
                base + str(images) + "/%c0%ae%c0%ae/" * 12 + "etc/passwd",
                base + str(images) + "/\uff0e\uff0e/" * 12 + "etc/passwd",
                base + str(images) + "/../" * 12 + "etc/passwd%00.jpg",
                base + "//etc/passwd", base + "file:///etc/passwd",
                base + str(guarded["state"] / "curation.sqlite"),
                base + str(guarded["index"] / "manifest.json")]
    for url in attempts:
        response = session.get(url)
        assert response.status_code in (400, 403, 404), (url, response.status_code)
        assert b"root:" not in response.content and b"SQLite format" not in response.content


def test_oversized_uploads_and_bombs_are_refused_and_the_server_stays_up(guarded: dict, tmp_path: Path) -> None:
    session = logged_in(guarded["url"])
    big = os.urandom(3 << 20)  # 3 MB against --max-upload-mb 1
    response = session.post("gradio_api/upload", files={"files": ("big.png", big, "image/png")})
    assert response.status_code in (400, 413), response.status_code

    bomb = tmp_path / "bomb.png"  # 20,000 x 20,000 pixels in a few hundred kB: over --max-pixels
    Image.new("L", (20_000, 20_000)).save(bomb, optimize=True)
    zipped = tmp_path / "bomb.zip"
    with zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("zeros.png", b"\0" * (60 << 20))  # 60 MB of zeros: a member over the 50 MB cap
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), "red").save(buffer, format="PNG")
        archive.writestr("fine.png", buffer.getvalue())
    assert zipped.stat().st_size < 1 << 20 and bomb.stat().st_size < 1 << 20
    client = Client(guarded["url"], auth=(USER, PASSWORD), verbose=False)
    _, table = client.predict([handle_file(str(bomb)), handle_file(str(zipped))], api_name="/batch_label")
    rows = {row[0]: row for row in table["data"]}
    assert rows["bomb.png"][-1] and rows["zeros.png"][-1], rows  # each refused with a reason
    assert not rows["fine.png"][-1] and rows["fine.png"][1] != "", rows
    assert guarded["process"].poll() is None
    assert client.predict("size", api_name="/overview")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (.ci/run does it)")
def test_script_in_a_cluster_name_never_runs_in_the_browser(guarded: dict, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    client = Client(guarded["url"], auth=(USER, PASSWORD), verbose=False)
    payload = "<img src=x onerror=\"document.title='pwned';alert(1)\"><script>document.title='pwned'</script>"
    client.predict(0, payload, api_name="/rename_cluster")
    dialogs: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        page.set_default_timeout(60_000)
        page.request.post(guarded["url"] + "login", form={"username": USER, "password": PASSWORD})
        page.goto(guarded["url"])  # the login cookie is shared with the page
        page.wait_for_selector("#cluster-cards button.thumbnail-item")
        page.wait_for_timeout(2_000)  # let every view render the name
        page.screenshot(path=tmp_path / "xss.png", full_page=True)
        title, text = page.title(), page.content()
        browser.close()
    assert dialogs == [] and title != "pwned"
    assert "<script>document.title" not in text  # shown as text, escaped
