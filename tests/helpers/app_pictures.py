"""Regenerate the guide's pictures of the app (docs/app.png, docs/app-map.png) from the shipped demo model.

Starts ``twist app`` with no arguments (the demo model on the digits, see twist_core/demo.py) on a free loopback
port with a fresh state folder, drives Debian's Chromium at 1400 px wide, and saves the Cluster view (an image
inspected) and the Map (a point clicked) as palette PNGs under 300 KB.
Usage: python tests/helpers/app_pictures.py [OUT_DIR]   (default: docs/)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))
from conftest import REPO, chromium_page, loneliest_map_point, start_app_server, stop_app_server  # noqa: E402

WIDTH, MAX_BYTES = 1400, 300_000


def save_small(shot: Path, out: Path) -> int:
    """The screenshot as a palette PNG, with fewer colours until it is under ``MAX_BYTES``; returns its size."""
    with Image.open(shot) as image:
        rgb = image.convert("RGB")
    for colours in (256, 128, 64, 32):
        rgb.quantize(colours, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
        if out.stat().st_size < MAX_BYTES:
            break
    return out.stat().st_size


def cluster_picture(page, shot: Path) -> None:
    """The Cluster view as it opens (the largest cluster), with its first image inspected."""
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Cluster", exact=True).click()
    page.locator("#cluster-gallery button.thumbnail-item").first.click()
    expect(page.locator("#inspect-neighbours button.thumbnail-item").first).to_be_visible()
    expect(page.locator("#inspect-image img")).to_be_visible()
    page.wait_for_timeout(1500)  # the class chart draws after its data arrives
    bottom = page.locator("#inspect-neighbours").evaluate("e => e.closest('.row').getBoundingClientRect().bottom")
    page.screenshot(path=shot, clip={"x": 0, "y": 0, "width": WIDTH, "height": bottom + 16}, full_page=True)


def map_picture(page, state: Path, shot: Path) -> None:
    """The Map as it opens, with its loneliest point clicked (that image, its neighbours and chart below)."""
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Map").click()
    picture = page.locator("#map-picture img")
    expect(picture).to_be_visible()
    cache = next(state.glob("projection-gen*.npz"))
    with np.load(cache) as cached:
        xy = cached["xy"]
    _, x, y = loneliest_map_point(xy)
    box = picture.bounding_box()
    natural_w, natural_h = picture.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    scale = min(box["width"] / natural_w, box["height"] / natural_h, 1.0)
    picture.click(position={"x": (box["width"] - natural_w * scale) / 2 + x * scale,
                            "y": (box["height"] - natural_h * scale) / 2 + y * scale})
    expect(page.locator("#map-neighbours button.thumbnail-item").first).to_be_visible()
    page.wait_for_timeout(1500)
    bottom = page.locator("#map-neighbours").evaluate("e => e.closest('.row').getBoundingClientRect().bottom")
    page.screenshot(path=shot, clip={"x": 0, "y": 0, "width": WIDTH, "height": bottom + 16}, full_page=True)


def main() -> None:
    from playwright.sync_api import expect

    out = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "docs"
    with tempfile.TemporaryDirectory(prefix="twist-app-pictures-") as folder:
        state = Path(folder) / "state"
        process, url = start_app_server(None, state, "--no-warm-thumbnails", timeout=600)
        try:
            with chromium_page(WIDTH) as page:
                page.goto(url)
                expect(page.locator("#summary")).to_contain_text("images in")
                cluster_picture(page, Path(folder) / "app.png")
                map_picture(page, state, Path(folder) / "app-map.png")
        finally:
            stop_app_server(process)
        for name in ("app.png", "app-map.png"):
            print(f"{out / name}: {save_small(Path(folder) / name, out / name):,} bytes")


if __name__ == "__main__":
    main()
