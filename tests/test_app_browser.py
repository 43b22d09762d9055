"""The web app in a real browser: Playwright drives Chromium through every view, as a new user would.

Every view must show something on first open (the Cluster and Map views an inspected image, Search a query and
its results, Suggested merges its estimate); a person's mistake goes to a toast and never turns a control into
Gradio's red "Error" badge; after a rename, merge, move or undo no view shows a name or a cluster of before.
Screenshots of each view at 1400 px wide are saved in the test's tmp folder and copied to
``test-artifacts/app-browser/`` (ignored by git; CI keeps it as an artifact).
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urljoin

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
from PIL import Image

from app.workspace import DISPLAY_SIDE
from twist_core.index.image_index import IndexReader

pytestmark = needs_chromium

# A status tracker Gradio shows over an output whose event failed: the red "Error" badge that hid the control.
ERROR_BADGE = "[data-testid=status-tracker]:not(.hide) .error"
THUMBNAIL_MAX = 200  # px: a selected image is a thumbnail, never blown up to the page's width


@pytest.fixture(scope="module")
def server(app_bundle: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    state = tmp_path_factory.mktemp("browser_state") / "state"
    process, url = start_app_server(app_bundle, state)
    try:
        yield {"url": url, "state": state, **app_bundle}
    finally:
        stop_app_server(process)


@pytest.fixture(scope="module")
def clusters(server: dict) -> list[dict]:
    """The index's clusters, largest first (the Cluster view opens on the first)."""
    index = IndexReader.open(server["index"], "cpu")
    try:
        return sorted(index.cluster_summary(), key=lambda c: (-c["size"], c["cluster"]))
    finally:
        index.close()


def test_every_view_opens_on_something_and_the_flow_works_in_chromium(server: dict, clusters: list[dict],
                                                                      tmp_path: Path) -> None:
    """Open, inspect, select, rename, search, export, map, merges, changes; a screenshot of every view."""
    from playwright.sync_api import expect

    shots = tmp_path / "screenshots"
    shots.mkdir()
    index = IndexReader.open(server["index"], "cpu")
    query = index.records(None, order_by="id", limit=1)[0].abs_path
    index.close()
    images = sum(c["size"] for c in clusters)

    with chromium_page() as page:
        page.goto(server["url"])
        expect(page.locator("#summary")).to_contain_text("images in")
        cards = page.locator("#cluster-cards button.thumbnail-item")
        expect(cards.first).to_be_visible()
        check_cards(page)
        page.screenshot(path=shots / "1-clusters.png", full_page=True)

        open_tab(page, "Cluster")  # opens on the largest cluster with its first image inspected, no click
        expect(page.locator("#page-info")).to_contain_text(f"{clusters[0]['size']:,} images")
        expect(page.locator("#inspect-details")).to_contain_text("nearest neighbours")
        first_image = page.locator("#cluster-gallery button.thumbnail-item").first
        expect(first_image).to_be_visible()
        inspect_then_select(page, page.locator("#cluster-gallery button.thumbnail-item").nth(3))
        page.screenshot(path=shots / "2-cluster.png", full_page=True)
        doubtful_first(page)
        rename(page, "Renamed in Chromium")

        open_tab(page, "Clusters")
        captions_are_whole(page, "Renamed in Chromium")
        if len(clusters) > 1:  # a card opens its cluster
            cards.nth(1).click()
            expect(page.locator("#page-info")).to_contain_text(f"{clusters[1]['size']:,} images")

        open_tab(page, "Search")
        expect(page.locator("#search-query img")).to_be_visible()  # a first search, before any upload
        page.locator("#search-upload input[type=file]").set_input_files(str(query))
        expect(page.locator("#search-results")).to_contain_text("sim 1.000")
        results_wrap(page)
        page.screenshot(path=shots / "3-search.png", full_page=True)

        exported = export_csv(page, tmp_path, images)
        toast_stays_in_its_tab(page)
        page.screenshot(path=shots / "4-merges.png", full_page=True)

        open_tab(page, "Map")  # drawn on opening, no button; an image inspected from the start
        expect(page.locator("#map-details")).to_contain_text("#")
        click_a_map_point(page, server["state"])
        page.screenshot(path=shots / "5-map.png", full_page=True)

        open_tab(page, "Batch")
        expect(page.get_by_role("button", name="Label them")).to_be_visible()
        expect(page.locator("#batch-table")).to_contain_text("cluster_name")  # real headers, not 1 2 3
        page.screenshot(path=shots / "6-batch.png", full_page=True)

        compare_with_the_labels(page, "Renamed in Chromium", clusters[0]["name"])
        page.screenshot(path=shots / "7-changes.png", full_page=True)
        assert page.locator(ERROR_BADGE).count() == 0

    assert "Renamed in Chromium" in exported.read_text()
    artifacts = keep_screenshots(shots, "app-browser")
    assert len(list(artifacts.glob("*.png"))) == 7


def test_mistakes_leave_the_controls_and_no_view_keeps_a_name_of_before(server: dict, clusters: list[dict],
                                                                        tmp_path: Path) -> None:
    """Every mistake a toast and nothing else; after rename, merge, move and undo every view shows the present."""
    from playwright.sync_api import expect

    if len(clusters) < 3:
        pytest.skip("the tiny model made fewer than three clusters")
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with chromium_page() as page:
        page.goto(server["url"])
        open_tab(page, "Cluster")
        expect(page.locator("#inspect-details")).to_contain_text("nearest neighbours")
        shown = page.locator("#cluster-choice input").input_value()
        for mistake, message in ((lambda: page.locator("#rename").click(), "cannot be empty"),
                                 (lambda: page.get_by_role("button", name="Merge", exact=True).click(), "choose"),
                                 (lambda: page.get_by_role("button", name="Move", exact=True).click(), "choose"),
                                 (lambda: page.get_by_role("button", name="Exclude").click(), "no images selected")):
            only_a_toast(page, mistake, message)
            assert page.locator("#cluster-choice input").input_value() == shown
        page.screenshot(path=shots / "1-after-mistakes.png", full_page=True)

        map_before = map_plot(page)
        open_tab(page, "Cluster")
        old_name = page.locator("#page-info strong").inner_text()
        rename(page, "~ Renamed again")  # sorts after every other name: the old legend order changed
        assert np.array_equal(map_plot(page), map_before)  # every cluster keeps its colour
        no_view_shows(page, old_name)

        merged = merge_the_second_cluster(page, clusters)
        page.screenshot(path=shots / "2-after-merge.png", full_page=True)
        no_view_shows(page, merged)
        moved_to = move_the_inspected_image(page)
        page.screenshot(path=shots / "3-after-move.png", full_page=True)
        undo(page, "undone: moved")
        expect(page.locator("#selection-gallery")).not_to_contain_text(f"· {moved_to}")
        undo(page, "undone: merged")
        assert any(option.endswith(f"· {merged}") or f"· {merged} (" in option
                   for option in dropdown_options(page, "merge-sources"))  # back after the undo
        page.screenshot(path=shots / "4-after-undo.png", full_page=True)
        assert page.locator(ERROR_BADGE).count() == 0
    keep_screenshots(shots, "app-browser-curation")


# ---- steps
def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()


def check_cards(page) -> None:
    """A cover's four tiles have gaps, the table has headers."""
    from playwright.sync_api import expect

    with served_picture(page, page.locator("#cluster-cards img").first) as picture:
        middle = np.asarray(picture.convert("L"))[:, picture.width // 2]
    assert middle.mean() > 245, middle.mean()  # a white gap between the tiles, top to bottom
    expect(page.locator("#clusters-table")).to_contain_text("mean confidence")


def captions_are_whole(page, name: str) -> None:
    """Card captions with a long name are whole: they wrap rather than end in "conf ..."."""
    from playwright.sync_api import expect

    captions = page.locator("#cluster-cards .caption-label")
    expect(captions.first).to_contain_text(name)
    cut = captions.evaluate_all("labels => labels.filter(l => l.scrollWidth > l.clientWidth + 1).length")
    assert cut == 0


def inspect_then_select(page, image) -> None:
    """A click inspects (large, sharp, neighbours beside it) and selects nothing; selecting is its own button."""
    from playwright.sync_api import expect

    image.click()
    number = re.search(r"#(\d+)", image.inner_text()).group(1)
    expect(page.locator("#inspect-details")).to_contain_text(f"#{number}")
    picture = page.locator("#inspect-image img")
    expect(picture).to_be_visible()
    page.wait_for_function("() => { const img = document.querySelector('#inspect-image img'); "
                           "return img && img.complete && img.naturalWidth > 0; }")  # the new picture has loaded
    natural = picture.evaluate("img => Math.max(img.naturalWidth, img.naturalHeight)")
    assert natural >= DISPLAY_SIDE - 32, natural  # a 32 px image arrives enlarged by nearest-neighbour sampling
    shown, neighbours = picture.bounding_box(), page.locator("#inspect-neighbours").bounding_box()
    assert max(shown["width"], shown["height"]) >= 0.8 * DISPLAY_SIDE, shown  # and is shown large
    assert neighbours["x"] >= shown["x"] + shown["width"] and neighbours["y"] < shown["y"] + shown["height"]
    expect(page.locator("#inspect-neighbours button.thumbnail-item").first).to_be_visible()
    # the chart's axis runs from 0 to 1: fitted to the data, a photo's one bar of 0.9999 drew as an empty chart
    expect(page.locator("#inspect-chart")).to_contain_text(re.compile(r"0\.0.*1\.0", re.S))
    last = page.locator("#inspect-neighbours button.thumbnail-item").last.bounding_box()
    assert neighbours["y"] + neighbours["height"] - (last["y"] + last["height"]) < 40, (neighbours, last)  # no gap
    expect(page.locator("#selection textarea")).to_have_value("")  # looking selects nothing
    expect(page.locator("#selection-count")).to_contain_text("0 selected")

    page.locator("#select-inspected").click()
    expect(page.locator("#selection textarea")).to_have_value(number)
    expect(page.locator("#selection-count")).to_contain_text("1 selected")
    thumbnail = page.locator("#selection-gallery button.thumbnail-item")
    expect(thumbnail).to_have_count(1)
    assert thumbnail.bounding_box()["width"] <= THUMBNAIL_MAX, thumbnail.bounding_box()
    move_row = page.locator("#move-target").bounding_box()
    count = page.locator("#selection-count").bounding_box()
    assert abs(count["y"] - move_row["y"]) < move_row["height"]  # the count is where Move is

    page.locator("#select-page").click()
    on_page = page.locator("#cluster-gallery button.thumbnail-item").count()
    expect(page.locator("#selection-count")).to_contain_text(f"{on_page} selected")
    page.locator("#selection-gallery button.thumbnail-item").first.click()  # drops it from the selection
    expect(page.locator("#selection-count")).to_contain_text(f"{on_page - 1} selected")
    page.get_by_role("button", name="Clear selection").click()
    expect(page.locator("#selection-count")).to_contain_text("0 selected")


def review_score(page, image) -> float:
    from playwright.sync_api import expect

    image.click()
    number = re.search(r"#(\d+)", image.inner_text()).group(1)
    expect(page.locator("#inspect-details")).to_contain_text(f"#{number} ")
    return float(re.search(r"review score ([\d.]+)", page.locator("#inspect-details").inner_text()).group(1))


def doubtful_first(page) -> None:
    """The cluster sorted by the review score: the first image is at least as doubtful as the last."""
    from playwright.sync_api import expect

    page.locator("#doubtful-first input").check()
    expect(page.locator("#page-info")).to_contain_text("most doubtful first")
    gallery = page.locator("#cluster-gallery button.thumbnail-item")
    last = review_score(page, gallery.nth(9))  # the first row's last
    assert review_score(page, gallery.first) >= last
    page.locator("#doubtful-first input").uncheck()
    expect(page.locator("#page-info")).to_contain_text("highest confidence first")


def rename(page, name: str) -> None:
    from playwright.sync_api import expect

    page.locator("#new-name textarea").fill(name)
    page.locator("#rename").click()
    expect(page.locator("#status")).to_contain_text(name)
    expect(page.locator("#page-info")).to_contain_text(name)
    expect(page.locator("#inspect-details")).to_contain_text(f"label: {name}")


def results_wrap(page) -> None:
    """Search results wrap into rows inside their gallery: none cut off, no blank band under them."""
    box = page.locator("#search-results").bounding_box()
    items = page.locator("#search-results button.thumbnail-item")
    rows = {round(items.nth(i).bounding_box()["y"]) for i in range(items.count())}
    last = items.last.bounding_box()
    assert len(rows) >= 2, rows
    assert last["x"] + last["width"] <= box["x"] + box["width"] + 1, (last, box)
    assert box["y"] + box["height"] - (last["y"] + last["height"]) < 40, (last, box)


def export_csv(page, folder: Path, images: int) -> Path:
    """The CSV downloads, and the page says what was written: the file and its rows."""
    from playwright.sync_api import expect

    open_tab(page, "Export")
    page.locator("#export-csv").click()
    link = page.locator("#export-file a").first
    expect(link).to_have_attribute("download", "labels.csv")
    expect(page.locator("#export-status")).to_contain_text(f"labels.csv: {images:,} images")
    with page.expect_download() as download:
        link.click()
    exported = folder / "labels.csv"
    download.value.save_as(exported)
    return exported


def toast_stays_in_its_tab(page) -> None:
    """An Export mistake's toast closes when another tab opens; Suggested merges opens computed, N at its estimate."""
    from playwright.sync_api import expect

    only_a_toast(page, lambda: page.get_by_role("button", name="Write tree").click(), "absolute", close=False)
    open_tab(page, "Suggested merges")
    expect(page.locator(".toast-body")).to_have_count(0)
    expect(page.locator("#merge-estimate")).to_contain_text("clusters")
    expect(page.locator("#merge-pairs")).to_contain_text("cluster A")
    estimate = re.search(r"groups: (\d+)", page.locator("#merge-estimate").inner_text())
    plan_to = page.locator("#merge-plan-to input")
    if estimate:
        expect(plan_to).to_have_value(estimate.group(1))
    assert int(plan_to.input_value()) >= 1
    assert page.locator(ERROR_BADGE).count() == 0


def click_a_map_point(page, state: Path) -> None:
    """The map is there on opening; a click on its loneliest point inspects that image."""
    from playwright.sync_api import expect

    picture = page.locator("#map-picture img")
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


def compare_with_the_labels(page, name: str, old_name: str) -> None:
    """The table of before/after counts has headers from the start and shows the clusters' current names."""
    from playwright.sync_api import expect

    open_tab(page, "Changes")
    expect(page.locator("#changes-table")).to_contain_text("before")
    page.locator("#changes-previous textarea").fill("labels.csv")  # twist label's table, beside the index
    page.locator("#changes-compare").click()
    expect(page.locator("#changes-summary")).to_contain_text("No image changed cluster")
    expect(page.locator("#changes-table")).to_contain_text(name)
    expect(page.locator("#changes-table")).not_to_contain_text(old_name)
    expect(page.locator("#changes-summary")).not_to_contain_text("first 0")
    expect(page.locator("#changes-gallery")).to_be_hidden()  # no empty box when no image changed cluster


def only_a_toast(page, mistake: Callable[[], None], message: str, close: bool = True) -> None:
    """A mistake says so in a toast, and no control turns into an "Error" badge."""
    from playwright.sync_api import expect

    mistake()
    expect(page.locator(".toast-body").filter(has_text=message)).to_be_visible()
    page.wait_for_timeout(300)  # the event's other outputs settle
    assert page.locator(ERROR_BADGE).count() == 0, page.locator(ERROR_BADGE).evaluate_all(
        "badges => badges.map(b => (b.closest('[id]') || {}).id)")
    if close:
        page.locator(".toast-close").evaluate_all("buttons => buttons.forEach(b => b.click())")
        expect(page.locator(".toast-body")).to_have_count(0)


def served_picture(page, image) -> Image.Image:
    """The picture an <img> of the page shows, as the server sent it."""
    return Image.open(io.BytesIO(page.request.get(urljoin(page.url, image.get_attribute("src"))).body()))


def map_plot(page) -> np.ndarray:
    """The Map view's plot area (the legend left out) as pixels, from the picture the app drew on this visit."""
    from playwright.sync_api import expect

    open_tab(page, "Map")
    expect(page.locator("#map-details")).to_contain_text("#")  # the visit's events have run
    page.wait_for_timeout(300)
    with served_picture(page, page.locator("#map-picture img")) as drawn:
        pixels = np.asarray(drawn.convert("RGB"))
    return pixels[:, : int(pixels.shape[1] * 0.78)]


VIEWS_WITH_NAMES = {"Cluster": ["#cluster-choice", "#page-info", "#inspect-details", "#inspect-neighbours",
                                "#selection-gallery"],
                    "Clusters": ["#cluster-cards", "#clusters-table"],
                    "Review": ["#review-gallery", "#review-details", "#review-neighbours"],
                    "Search": ["#search-results"],
                    "Map": ["#map-details", "#map-neighbours"],
                    "Suggested merges": ["#merge-pairs", "#merge-pair", "#merge-pair-gallery"]}


def no_view_shows(page, name: str) -> None:
    """``name`` (a cluster renamed or merged away) shows in no view: texts, captions, chosen dropdown values.

    A name inside a file path (``shapes/discs/000.png``) is not a cluster's name and does not count.
    """
    from playwright.sync_api import expect

    stale = re.compile(rf"(?<![/\w]){re.escape(name)}(?![/\w])")
    for tab, places in VIEWS_WITH_NAMES.items():
        open_tab(page, tab)
        expect(page.locator(places[0])).to_be_visible()
        page.wait_for_timeout(500)  # the visit's refresh lands
        for place in places:
            texts = [page.locator(place).inner_text(), *page.locator(f"{place} input").evaluate_all(
                "inputs => inputs.map(i => i.value)")]
            assert not any(stale.search(text) for text in texts), (tab, place, texts)
    open_tab(page, "Cluster")
    assert not any(stale.search(option) for option in dropdown_options(page, "cluster-choice"))


def dropdown_options(page, elem_id: str) -> list[str]:
    """The option texts a person sees when opening the dropdown ``elem_id``."""
    page.locator(f"#{elem_id} input").click()
    options = page.locator(f"#{elem_id} [role=option]")
    options.first.wait_for()
    texts = [str(options.nth(i).get_attribute("aria-label")) for i in range(options.count())]
    close_dropdown(page, elem_id)
    return texts


def close_dropdown(page, elem_id: str) -> None:
    """Close it and leave it: a click on a dropdown that still has the focus does not open it again."""
    page.keyboard.press("Escape")
    page.locator(f"#{elem_id} input").blur()


def choose(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.locator(f"#{elem_id} [role=option][aria-label='{option}']").click()
    close_dropdown(page, elem_id)


def merge_the_second_cluster(page, clusters: list[dict]) -> str:
    """Merge the second cluster into the open one: the Merge box empties, Move shows a name, not a number."""
    from playwright.sync_api import expect

    open_tab(page, "Cluster")
    second = next(o for o in dropdown_options(page, "merge-sources")
                  if o.startswith(f"{clusters[1]['cluster']} · "))
    name = second.split(" · ", 1)[1].rsplit(" (", 1)[0]
    choose(page, "merge-sources", second)
    choose(page, "move-target", second)  # chosen before the merge: it must not linger as a number or a ghost
    page.get_by_role("button", name="Merge", exact=True).click()
    expect(page.locator("#status")).to_contain_text("merged into")
    expect(page.locator("#merge-sources .token")).to_have_count(0)
    expect(page.locator("#move-target input")).to_have_value("")  # its cluster is gone: no bare number
    assert second not in dropdown_options(page, "merge-sources")
    return name


def move_the_inspected_image(page) -> str:
    """Select the inspected image, move it: its thumbnail's caption names the cluster it went to."""
    from playwright.sync_api import expect

    page.locator("#select-inspected").click()
    expect(page.locator("#selection-count")).to_contain_text("1 selected")
    shown = page.locator("#cluster-choice input").input_value()
    target = next(o for o in dropdown_options(page, "move-target") if o != shown)
    choose(page, "move-target", target)
    name = target.split(" · ", 1)[1].rsplit(" (", 1)[0]
    page.get_by_role("button", name="Move", exact=True).click()
    expect(page.locator("#status")).to_contain_text("1 image(s) moved")
    expect(page.locator("#selection-gallery")).to_contain_text(f"· {name}")
    expect(page.locator("#inspect-details")).to_contain_text(f"label: {name}")
    expect(page.locator("#move-target input")).to_have_value(re.compile(r"^\d+ · .+ \(\d+\)$"))
    return name


def undo(page, message: str) -> None:
    from playwright.sync_api import expect

    page.locator("#undo").click()
    expect(page.locator("#status")).to_contain_text(message)
