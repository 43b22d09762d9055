"""The web app in a real browser: Playwright drives Chromium through every view, as a new user would.

Every view must show something on first open (the Cluster view its largest cluster, the Map its picture).
A screenshot of each view at 1400 px wide is saved in the test's tmp folder and copied to
``test-artifacts/app-browser/`` (ignored by git; CI keeps it as an artifact).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    chromium_page,
    keep_screenshots,
    loneliest_map_point,
    needs_chromium,
    start_app_server,
    stop_app_server,
)

from app.workspace import DISPLAY_SIDE
from twist_core.index.image_index import IndexReader

pytestmark = needs_chromium


@pytest.fixture(scope="module")
def server(app_bundle: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    state = tmp_path_factory.mktemp("browser_state") / "state"
    process, url = start_app_server(app_bundle, state)
    try:
        yield {"url": url, "state": state, **app_bundle}
    finally:
        stop_app_server(process)


def test_every_view_opens_on_something_and_the_flow_works_in_chromium(server: dict, tmp_path: Path) -> None:
    """Open, inspect, select, rename, search, export, map; a screenshot of every view at 1400 px wide."""
    from playwright.sync_api import expect

    shots = tmp_path / "screenshots"
    shots.mkdir()
    index = IndexReader.open(server["index"], "cpu")
    by_size = sorted(index.cluster_summary(), key=lambda c: (-c["size"], c["cluster"]))
    query = index.records(None, order_by="id", limit=1)[0].abs_path
    index.close()

    with chromium_page() as page:
        page.goto(server["url"])
        expect(page.locator("#summary")).to_contain_text("images in")
        cards = page.locator("#cluster-cards button.thumbnail-item")
        expect(cards.first).to_be_visible()
        page.screenshot(path=shots / "1-clusters.png", full_page=True)

        page.get_by_role("tab", name="Cluster", exact=True).click()  # opens on the largest cluster, no choice
        expect(page.locator("#page-info")).to_contain_text(f"{by_size[0]['size']:,} images")
        first_image = page.locator("#cluster-gallery button.thumbnail-item").first
        expect(first_image).to_be_visible()
        inspect_and_select(page, first_image)
        page.screenshot(path=shots / "2-cluster.png", full_page=True)
        rename(page)

        if len(by_size) > 1:  # a card opens its cluster
            page.get_by_role("tab", name="Clusters", exact=True).click()
            cards.nth(1).click()
            expect(page.locator("#page-info")).to_contain_text(f"{by_size[1]['size']:,} images")

        page.get_by_role("tab", name="Search").click()
        page.locator("#search-upload input[type=file]").set_input_files(str(query))
        results = page.locator("#search-results button.thumbnail-item")
        expect(results.first).to_be_visible()
        expect(page.locator("#search-results")).to_contain_text("sim 1.000")
        page.screenshot(path=shots / "3-search.png", full_page=True)

        exported = export_csv(page, tmp_path)
        page.screenshot(path=shots / "4-export.png", full_page=True)

        page.get_by_role("tab", name="Map").click()  # drawn on opening, no button
        click_a_map_point(page, server["state"])
        page.screenshot(path=shots / "5-map.png", full_page=True)

        page.get_by_role("tab", name="Batch").click()
        expect(page.get_by_role("button", name="Label them")).to_be_visible()
        page.screenshot(path=shots / "6-batch.png", full_page=True)

    assert "Renamed in Chromium" in exported.read_text()
    artifacts = keep_screenshots(shots, "app-browser")
    assert len(list(artifacts.glob("*.png"))) == 6


def inspect_and_select(page, image) -> None:
    """Click an image: it is shown enlarged (sharp), its neighbours beside it, and it joins the selection."""
    from playwright.sync_api import expect

    image.click()
    expect(page.locator("#inspect-details")).to_contain_text("confidence")
    expect(page.locator("#selection textarea")).to_have_value(re.compile(r"^\d+$"))
    picture = page.locator("#inspect-image img")
    expect(picture).to_be_visible()
    natural = picture.evaluate("img => Math.max(img.naturalWidth, img.naturalHeight)")
    assert natural >= DISPLAY_SIDE - 32, natural  # a 32 px image arrives enlarged by nearest-neighbour sampling
    shown, neighbours = picture.bounding_box(), page.locator("#inspect-neighbours").bounding_box()
    assert max(shown["width"], shown["height"]) >= 0.8 * DISPLAY_SIDE, shown  # and is shown large
    assert neighbours["x"] >= shown["x"] + shown["width"] and neighbours["y"] < shown["y"] + shown["height"]
    expect(page.locator("#inspect-neighbours button.thumbnail-item").first).to_be_visible()
    last = page.locator("#inspect-neighbours button.thumbnail-item").last.bounding_box()
    assert neighbours["y"] + neighbours["height"] - (last["y"] + last["height"]) < 40, (neighbours, last)  # no gap

    page.locator("#select-page").click()
    on_page = page.locator("#cluster-gallery button.thumbnail-item").count()
    expect(page.locator("#selection-count")).to_contain_text(f"{on_page} selected")
    page.locator("#selection-gallery button.thumbnail-item").first.click()  # drops it from the selection
    expect(page.locator("#selection-count")).to_contain_text(f"{on_page - 1} selected")


def rename(page) -> None:
    from playwright.sync_api import expect

    page.locator("#new-name textarea").fill("Renamed in Chromium")
    page.locator("#rename").click()
    expect(page.locator("#status")).to_contain_text("Renamed in Chromium")
    expect(page.locator("#page-info")).to_contain_text("Renamed in Chromium")


def export_csv(page, folder: Path) -> Path:
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Export").click()
    page.locator("#export-csv").click()
    link = page.locator("#export-file a").first
    expect(link).to_have_attribute("download", "labels.csv")
    with page.expect_download() as download:
        link.click()
    exported = folder / "labels.csv"
    download.value.save_as(exported)
    return exported


def click_a_map_point(page, state: Path) -> None:
    """The map is there on opening; a click on its loneliest point inspects that image."""
    from playwright.sync_api import expect

    picture = page.locator("#map-image img")
    expect(picture).to_be_visible()
    with np.load(state / "projection-gen1.npz") as cached:
        ids, xy = cached["ids"], cached["xy"]
    row, x, y = loneliest_map_point(xy)
    box = picture.bounding_box()
    natural_w, natural_h = picture.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    scale = min(box["width"] / natural_w, box["height"] / natural_h, 1.0)  # object-fit: contain
    picture.click(position={"x": (box["width"] - natural_w * scale) / 2 + x * scale,
                            "y": (box["height"] - natural_h * scale) / 2 + y * scale})
    expect(page.locator("#map-id input")).to_have_value(str(int(ids[row])))
    expect(page.locator("#map-details")).to_contain_text(f"#{int(ids[row])}")
    expect(page.locator("#map-neighbours button.thumbnail-item").first).to_be_visible()
