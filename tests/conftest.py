"""Shared fixtures: real images (CIFAR-10 slices from ../shared/data or drawn shapes) and a tiny trained run."""

from __future__ import annotations

import contextlib
import os
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("TWIST_SHARED_DATA", REPO.parent / "shared" / "data"))
CIFAR_TEST = SHARED_DATA / "cifar10-test.tar.gz"


def extract_cifar_slice(destination: Path, per_class: int, archive: Path = CIFAR_TEST) -> Path:
    """Extract the first ``per_class`` images of each class into ``destination/<class>/``."""
    if not archive.exists():
        if os.environ.get("TWIST_REQUIRE_DATA"):
            pytest.fail(f"{archive} not found but TWIST_REQUIRE_DATA is set")
        pytest.skip(f"{archive} not found (CI checks it is there, so this never skips in CI)")
    taken: dict[str, int] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if not member.isfile() or not member.name.endswith(".jpg"):
                continue
            parts = Path(member.name).parts  # test/<class>/NNNN.jpg
            label = parts[-2]
            if taken.get(label, 0) >= per_class:
                continue
            taken[label] = taken.get(label, 0) + 1
            target = destination / label / parts[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as source:  # type: ignore[union-attr]
                target.write_bytes(source.read())
    return destination


@pytest.fixture(scope="session")
def cifar_1k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1,000 real CIFAR-10 test images (100 per class) in class folders."""
    return extract_cifar_slice(tmp_path_factory.mktemp("cifar1k"), per_class=100)


def draw_shapes_folder(root: Path, n_per_class: int = 24, size: int = 32, seed: int = 0) -> Path:
    """Two visually distinct classes of small images (discs and stripes) with noise; cheap and deterministic."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    for label in ("discs", "stripes"):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            if label == "discs":
                cy, cx, r = [*rng.uniform(size * 0.3, size * 0.7, 2).tolist(), rng.uniform(size * 0.2, size * 0.35)]
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
            else:
                period = rng.uniform(4, 8)
                mask = np.sin(xx * 2 * np.pi / period + rng.uniform(0, 6)) > 0
            colour = rng.uniform(80, 255, 3)
            image = np.where(mask[..., None], colour, 255 - colour) + rng.normal(0, 12, (size, size, 3))
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / label / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def shapes_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return draw_shapes_folder(tmp_path_factory.mktemp("shapes"))


def tiny_train_config(data: Path, out: Path, **overrides):
    """A configuration that trains in seconds on the CPU: the default backbone, narrowed, small head, no workers."""
    from twist_core.train.options import TrainConfig

    settings = dict(data=str(data), out=str(out), classes=4, width=8, hidden_dim=64, image_size=32, epochs=1,
                    batch_size=16, workers=0, progress=False, checkpoint_every=0, self_label_fraction=0.0)
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, shapes_folder: Path) -> Path:
    """A real (tiny) training run folder: config.json, metrics.jsonl, last.pt."""
    from twist_core.train.loop import train

    out = tmp_path_factory.mktemp("tiny_run")
    train(tiny_train_config(shapes_folder, out, epochs=2))
    return out


@pytest.fixture(scope="session")
def app_bundle(tiny_run: Path, shapes_folder: Path, cifar_1k: Path, tmp_path_factory: pytest.TempPathFactory
               ) -> dict[str, Path]:
    """The web app's inputs made by the real pipeline: export the tiny run, label a folder, index it.

    The folder mixes the drawn shapes with 20 CIFAR images per class (about 250 images).
    """
    base = tmp_path_factory.mktemp("app_bundle")
    images = base / "images"
    shutil.copytree(shapes_folder, images / "shapes")
    for class_dir in sorted(p for p in cifar_1k.iterdir() if p.is_dir()):
        (images / "cifar" / class_dir.name).mkdir(parents=True)
        for picture in sorted(class_dir.iterdir())[:20]:
            shutil.copy(picture, images / "cifar" / class_dir.name / picture.name)
    model = export_label_index(tiny_run, images, base / "model.onnx", base / "labels.csv", base / "index")
    return {"model": model, "index": base / "index", "images": images}


def export_label_index(run: Path, images: Path, model: Path, labels: Path, index: Path) -> Path:
    """The app's inputs from a run: export it (the four shape names), label ``images``, index the labels."""
    from twist_core.deploy.export import ExportConfig, export_model
    from twist_core.index.build import IndexConfig, build_index
    from twist_core.label.labeller import LabelConfig, label_folder

    model = export_model(ExportConfig(run=str(run), out=str(model), class_names="discs,stripes,animals,vehicles"))
    label_folder(LabelConfig(model=str(model), folder=str(images), out=str(labels), workers=0, progress=False))
    build_index(IndexConfig(source=str(labels), model=str(model), out=str(index), device="cpu"))
    return model


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_app_server(bundle: dict[str, Path] | None, state_dir: Path, *extra: str, timeout: float = 120.0,
                     env: dict[str, str] | None = None):
    """``twist app`` in a subprocess on a free loopback port; returns (process, base URL) once it answers.

    ``bundle=None`` starts it with no --model/--index, as a new user does.
    """
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    log = open(state_dir.parent / f"{state_dir.name}-server.log", "w")  # noqa: SIM115 (closed with the process)
    process = subprocess.Popen(
        [sys.executable, "-m", "twist_core.cli", "app",
         *(["--model", str(bundle["model"]), "--index", str(bundle["index"])] if bundle else []),
         "--state-dir", str(state_dir), "--port", str(port), *extra],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})})
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"twist app exited with {process.returncode}: {Path(log.name).read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            time.sleep(0.3)
    process.terminate()
    raise RuntimeError(f"twist app did not answer within {timeout:.0f} s")


def stop_app_server(process) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except Exception:
        process.kill()
        process.wait()


def loneliest_map_point(xy: np.ndarray) -> tuple[int, float, float]:
    """Row and drawn pixel (x, y) of the map point farthest from any other: a click on it is unambiguous."""
    from app.projection import MapGeometry

    pixels = MapGeometry.around(xy).to_pixels(xy)
    gaps = np.hypot(*(pixels[:, None] - pixels[None]).transpose(2, 0, 1)) + np.eye(len(xy)) * 1e9
    row = int(gaps.min(axis=1).argmax())
    return row, float(pixels[row, 0]), float(pixels[row, 1])


def keep_screenshots(shots: Path, name: str) -> Path:
    """Copy a browser test's screenshots to ``test-artifacts/NAME`` (replacing the last run's) for people to see."""
    artifacts = REPO / "test-artifacts" / name
    shutil.rmtree(artifacts, ignore_errors=True)
    shutil.copytree(shots, artifacts)
    return artifacts


CHROMIUM = Path("/usr/bin/chromium")  # Debian's, installed by .ci/run
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--no-first-run"]
BROWSER_TIMEOUT_MS = 60_000  # a loaded 2-core machine can take seconds per step
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(),
                                    reason="Debian's chromium is not installed (.ci/run does it)")


@contextlib.contextmanager
def chromium_page(width: int = 1400, height: int = 1000) -> Iterator[Any]:
    """A page of headless Chromium at ``width`` px, with timeouts long enough for a busy machine."""
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=BROWSER_TIMEOUT_MS)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(BROWSER_TIMEOUT_MS)
            yield page
        finally:
            browser.close()
