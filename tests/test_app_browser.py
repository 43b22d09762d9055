"""The web app in a real browser: Playwright drives Chromium through open, select, rename, search, export, map.

Screenshots of each step are saved in the test's tmp folder and copied to ``test-artifacts/app-browser/``.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, loneliest_map_point, start_app_server, stop_app_server

from twist_core.index import ImageIndex

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]
TIMEOUT_MS = 60_000

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (.ci/run does it)")


@pytest.fixture(scope="module")
def server(app_bundle: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    state = tmp_path_factory.mktemp("browser_state") / "state"
    process, url = start_app_server(app_bundle, state)
    try:
        yield {"url": url, "state": state, **app_bundle}
    finally:
        stop_app_server(process)


def test_open_rename_search_and_export_in_chromium(server: dict, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)  # a loaded 2-core machine can take seconds per step
    shots = tmp_path / "screenshots"
    shots.mkdir()
    index = ImageIndex.open(server["index"], "cpu")
    biggest = max(index.cluster_summary(), key=lambda c: (c["size"], -c["cluster"]))
    query = index.records(None, order_by="id", limit=1)[0].abs_path
    index.close()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        try:
            page.goto(server["url"])
            expect(page.locator("#summary")).to_contain_text("images in")
            cards = page.locator("#cluster-cards button.thumbnail-item")
            expect(cards.first).to_be_visible()
            page.screenshot(path=shots / "1-overview.png", full_page=True)

            cards.first.click()  # the largest cluster comes first (sorted by size)
            expect(page.locator("#page-info")).to_contain_text(f"{biggest['size']:,} images")
            first_image = page.locator("#cluster-gallery button.thumbnail-item").first
            expect(first_image).to_be_visible()
            first_image.click()
            expect(page.locator("#details")).to_contain_text("confidence")
            expect(page.locator("#selection textarea")).to_have_value(re.compile(r"^\d+$"))
            page.locator("#select-page").click()
            on_page = page.locator("#cluster-gallery button.thumbnail-item").count()
            expect(page.locator("#selection-count")).to_contain_text(f"{on_page} selected")
            page.locator("#selection-gallery button.thumbnail-item").first.click()  # drops it from the selection
            expect(page.locator("#selection-count")).to_contain_text(f"{on_page - 1} selected")
            page.screenshot(path=shots / "2-cluster.png", full_page=True)

            page.locator("#new-name textarea").fill("Renamed in Chromium")
            page.locator("#rename").click()
            expect(page.locator("#status")).to_contain_text("Renamed in Chromium")
            expect(page.locator("#page-info")).to_contain_text("Renamed in Chromium")
            page.screenshot(path=shots / "3-renamed.png", full_page=True)

            page.get_by_role("tab", name="Search").click()
            page.locator("#search-upload input[type=file]").set_input_files(str(query))
            results = page.locator("#search-results button.thumbnail-item")
            expect(results.first).to_be_visible()
            expect(page.locator("#search-results")).to_contain_text("sim 1.000")
            page.screenshot(path=shots / "4-search.png", full_page=True)

            page.get_by_role("tab", name="Export").click()
            page.locator("#export-csv").click()
            link = page.locator("#export-file a").first
            expect(link).to_have_attribute("download", "labels.csv")
            with page.expect_download() as download:
                link.click()
            exported = tmp_path / "labels.csv"
            download.value.save_as(exported)
            page.screenshot(path=shots / "5-export.png", full_page=True)

            page.get_by_role("tab", name="Map").click()
            page.locator("#draw-map").click()
            picture = page.locator("#map-image img")
            expect(picture).to_be_visible()
            with np.load(server["state"] / "projection-gen1.npz") as cached:
                ids, xy = cached["ids"], cached["xy"]
            row, x, y = loneliest_map_point(xy)
            box = picture.bounding_box()
            natural_w, natural_h = picture.evaluate("img => [img.naturalWidth, img.naturalHeight]")
            scale = min(box["width"] / natural_w, box["height"] / natural_h, 1.0)  # object-fit: contain
            picture.click(position={"x": (box["width"] - natural_w * scale) / 2 + x * scale,
                                    "y": (box["height"] - natural_h * scale) / 2 + y * scale})
            expect(page.locator("#map-id input")).to_have_value(str(int(ids[row])))
            expect(page.locator("#map-details")).to_contain_text(f"#{int(ids[row])}")
            page.screenshot(path=shots / "6-map.png", full_page=True)
        finally:
            browser.close()

    assert "Renamed in Chromium" in exported.read_text()
    artifacts = REPO / "test-artifacts" / "app-browser"
    shutil.rmtree(artifacts, ignore_errors=True)
    shutil.copytree(shots, artifacts)
    assert len(list(artifacts.glob("*.png"))) == 6
