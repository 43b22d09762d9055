"""The Batch tab against uploads that are small on the wire and huge once decoded, on a live ``twist app``.

The server's peak memory is read from ``/proc/PID/status`` (VmHWM, reset through ``clear_refs`` before the
request), so the test sees what the process really held, not what Python thinks it allocated.
"""

from __future__ import annotations

import csv
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import start_app_server, stop_app_server
from gradio_client import Client, handle_file
from PIL import Image

from app.workspace import MAX_BATCH_PIXELS

SIDE = 6000  # 36 M pixels: under --max-pixels, about 108 MB decoded
MAX_PEAK_RISE_MB = 400  # one huge image decoded at a time; eight held at once needed about 1.2 GB

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/status")


@pytest.fixture(scope="module")
def server(app_bundle: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    state = tmp_path_factory.mktemp("batch_state") / "state"
    process, url = start_app_server(app_bundle, state, "--no-warm-thumbnails")
    try:
        yield {"url": url, "pid": process.pid}
    finally:
        stop_app_server(process)


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6000 x 6000 PNG of colour bands: a few KB on disk."""
    bands = np.repeat(np.linspace(0, 255, SIDE // 100, dtype=np.uint8), 100)[:SIDE]
    path = tmp_path_factory.mktemp("huge") / "huge.png"
    Image.fromarray(np.stack([np.tile(bands, (SIDE, 1))] * 3, axis=-1)).save(path, optimize=True)
    return path


def zip_of(huge_png: Path, out: Path, copies: int) -> Path:
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for i in range(copies):
            archive.write(huge_png, f"huge/{i}.png")
    return out


def status_kb(pid: int, field: str) -> int:
    line = next(li for li in Path(f"/proc/{pid}/status").read_text().splitlines() if li.startswith(field + ":"))
    return int(line.split()[1])


def test_a_zip_of_huge_images_is_labelled_one_image_at_a_time(server: dict, huge_png: Path, tmp_path: Path) -> None:
    client = Client(server["url"], verbose=False)
    bundle = zip_of(huge_png, tmp_path / "huge.zip", 8)
    client.predict([handle_file(str(huge_png))], api_name="/batch_label")  # first use: lazy imports, warm caches
    before = status_kb(server["pid"], "VmRSS")
    Path(f"/proc/{server['pid']}/clear_refs").write_text("5")  # peak := now
    out, _ = client.predict([handle_file(str(bundle))], api_name="/batch_label")
    rise_mb = (status_kb(server["pid"], "VmHWM") - before) / 1024
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["file"] for r in rows] == [f"huge/{i}.png" for i in range(8)]
    assert all(r["cluster"] != "" and not r["error"] for r in rows)
    assert len({r["cluster"] for r in rows}) == 1  # the same picture eight times gets one answer
    assert rise_mb < MAX_PEAK_RISE_MB, f"the server's peak memory rose by {rise_mb:.0f} MB"


def test_a_batch_over_the_pixel_budget_is_refused_before_decoding(server: dict, huge_png: Path,
                                                                   tmp_path: Path) -> None:
    copies = MAX_BATCH_PIXELS // SIDE**2 + 1
    bundle = zip_of(huge_png, tmp_path / "too-many.zip", copies)
    with pytest.raises(Exception, match=r"pixels in all.*at most") as refused:
        Client(server["url"], verbose=False).predict([handle_file(str(bundle))], api_name="/batch_label")
    assert "Traceback" not in str(refused.value)
