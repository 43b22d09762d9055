"""The app keeps up with its curation: a page opened after a rename or a merge, or a restart, lists what is true now.

A live ``twist app`` on loopback is curated through the API (another user, another tab); a freshly opened
Chromium page and a fresh API session must then offer exactly the clusters that exist, under their new names.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import start_app_server, stop_app_server
from gradio_client import Client

from twist_core.deploy.infer import OnnxModel
from twist_core.index.image_index import IndexReader

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"]
TIMEOUT_MS = 60_000
DROPDOWNS = ("cluster-choice", "merge-sources", "move-target")


@pytest.fixture(scope="module")
def clusters(app_bundle: dict[str, Path]) -> list[int]:
    """Every cluster of the model, the largest first."""
    index = IndexReader.open(app_bundle["index"], "cpu")
    sizes = {c["cluster"]: c["size"] for c in index.cluster_summary()}
    index.close()
    n_classes = OnnxModel(app_bundle["model"], device="cpu").n_classes
    return sorted(range(n_classes), key=lambda c: (-sizes.get(c, 0), c))


@contextmanager
def app_server(bundle: dict[str, Path], state: Path) -> Iterator[str]:
    process, url = start_app_server(bundle, state)
    try:
        yield url
    finally:
        stop_app_server(process)


def test_a_cluster_unmerged_after_a_restart_can_be_used_again(app_bundle: dict[str, Path], clusters: list[int],
                                                              tmp_path: Path) -> None:
    """Merged before the server started, then undone: a fresh API session must accept the cluster again."""
    target, source = clusters[0], clusters[1]
    with app_server(app_bundle, tmp_path / "state") as url:
        Client(url, verbose=False).predict([source], target, api_name="/merge_clusters")
    with app_server(app_bundle, tmp_path / "state") as url:
        assert "undone: merged" in Client(url, verbose=False).predict(api_name="/undo")[0]
        fresh = Client(url, verbose=False)
        _, info, _ = fresh.predict(source, 0, False, 0, 1, api_name="/open_cluster")
        assert "images in the confidence range" in info
        index = IndexReader.open(app_bundle["index"], "cpu")
        first = index.records(target, limit=1)[0].id
        index.close()
        status, *_ = fresh.predict(str(first), source, api_name="/move_images")
        assert "1 image(s) moved" in status
        fresh.predict([source], target, api_name="/merge_clusters")
        with pytest.raises(Exception, match="there is no cluster 99"):
            fresh.predict(99, 0, False, 0, 1, api_name="/open_cluster")


def merge_and_rename(url: str, source: int, target: int, name: str) -> None:
    client = Client(url, verbose=False)
    client.predict([source], target, api_name="/merge_clusters")
    client.predict(target, name, api_name="/rename_cluster")


def dropdown_options(page, elem_id: str) -> list[str]:
    """The option texts a person sees when opening the dropdown ``elem_id``."""
    page.locator(f"#{elem_id} input").click()
    options = page.locator(f"#{elem_id} [role=option]")
    options.first.wait_for()
    texts = [str(options.nth(i).get_attribute("aria-label")) for i in range(options.count())]
    page.keyboard.press("Escape")
    return texts


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (.ci/run does it)")
def test_a_page_opened_after_a_merge_and_rename_lists_the_clusters_of_now(app_bundle: dict[str, Path],
                                                                          clusters: list[int], tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)
    target, source = clusters[0], clusters[1]
    with app_server(app_bundle, tmp_path / "state") as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            early = browser.new_page()
            early.goto(server)  # a tab open before the change
            expect(early.locator("#summary")).to_contain_text("images in")
            merge_and_rename(server, source, target, "Renamed elsewhere")
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(server)
            expect(page.locator("#summary")).to_contain_text("images in")
            page.get_by_role("tab", name="Cluster", exact=True).click()
            for elem_id in DROPDOWNS:
                texts = dropdown_options(page, elem_id)
                assert any(t.startswith(f"{target} · Renamed elsewhere") for t in texts), (elem_id, texts)
                assert not any(t.startswith(f"{source} ·") for t in texts), (elem_id, texts)
            early.reload()  # the tab open before the change, reloaded
            early.get_by_role("tab", name="Cluster", exact=True).click()
            assert not any(t.startswith(f"{source} ·") for t in dropdown_options(early, "cluster-choice"))
        finally:
            browser.close()
