"""Every kind of file a real photo folder holds: valid oddities are decoded, broken files are named and skipped."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import draw_shapes_folder, tiny_train_config
from PIL import Image

from twist_core.data.dataset import FolderImages
from twist_core.data.folder import NoImagesError, decode_image, ground_truth_labels, scan_folder
from twist_core.train.loop import train

BROKEN = {"broken/truncated.jpg", "broken/empty.png", "broken/text.jpg", "broken/noise.png", "broken/huge.png"}
ODD_VALID = {"odd/cmyk.jpg", "odd/palette_alpha.png", "odd/la.png", "odd/gray16.png", "odd/gray.png",
             "odd/UPPER.JPG", "odd/tiff.TIFF", "odd/webp.webp", "odd/bitmap.bmp", "odd/anim.gif",
             "odd/exif_rotated.jpeg", "odd/float.tif", "odd/mono.png"}
MAX_PIXELS = 250 * 250


def gradient(size: int = 40) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    return np.stack([xx * 6, yy * 6, (xx + yy) * 3], -1).clip(0, 255).astype(np.uint8)


def make_odd_and_broken(root: Path) -> None:
    odd, broken = root / "odd", root / "broken"
    odd.mkdir()
    broken.mkdir()
    rgb = Image.fromarray(gradient())
    rgb.convert("CMYK").save(odd / "cmyk.jpg")
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    palette.save(odd / "palette_alpha.png", transparency=0)
    Image.fromarray(gradient()[..., :2].copy(), mode="LA").save(odd / "la.png")
    Image.fromarray(gradient()[..., 0].astype(np.uint16) * 257).save(odd / "gray16.png")
    rgb.convert("L").save(odd / "gray.png")
    rgb.save(odd / "UPPER.JPG", format="JPEG")
    rgb.save(odd / "tiff.TIFF", format="TIFF")
    rgb.save(odd / "webp.webp", format="WEBP")
    rgb.save(odd / "bitmap.bmp", format="BMP")
    frames = [rgb, rgb.rotate(90)]
    frames[0].save(odd / "anim.gif", save_all=True, append_images=frames[1:])
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.fromarray(gradient()[:, :30].copy()).save(odd / "exif_rotated.jpeg", exif=exif)
    Image.fromarray(gradient()[..., 0].astype(np.float32) / 7.0, mode="F").save(odd / "float.tif")
    rgb.convert("1").save(odd / "mono.png")
    # Broken files.
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG")
    (broken / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (broken / "empty.png").write_bytes(b"")
    (broken / "text.jpg").write_text("this is not an image")
    (broken / "noise.png").write_bytes(os.urandom(2000))
    Image.new("RGB", (300, 300), (10, 20, 30)).save(broken / "huge.png")  # over MAX_PIXELS
    # Ignored: hidden and system files, other extensions, a symlink loop.
    (root / ".hidden.jpg").write_bytes(buffer.getvalue())
    (root / "Thumbs.db").write_bytes(b"\0" * 10)
    (root / "notes.txt").write_text("hello")
    (root / "odd" / "loop").symlink_to(root, target_is_directory=True)


@pytest.fixture()
def messy_folder(tmp_path: Path) -> Path:
    root = draw_shapes_folder(tmp_path / "photos", n_per_class=16)
    make_odd_and_broken(root)
    return root


def test_scan_is_sorted_recursive_and_ignores_hidden_system_and_loops(messy_folder: Path) -> None:
    files = scan_folder(messy_folder)
    assert files == sorted(files)
    assert set(files) >= ODD_VALID | BROKEN
    assert not any(name.startswith(".") or "Thumbs" in name or name.endswith(".txt") for name in files)
    assert not any("loop/" in name for name in files)
    assert len(files) == 32 + len(ODD_VALID) + len(BROKEN)


def test_odd_valid_images_decode_to_rgb(messy_folder: Path) -> None:
    for name in sorted(ODD_VALID):
        image = decode_image(messy_folder / name, MAX_PIXELS)
        assert image.mode == "RGB", name
        assert np.asarray(image).std() > 5, f"{name} decoded to a flat image"
    assert decode_image(messy_folder / "odd/exif_rotated.jpeg").size == (40, 30)  # EXIF orientation applied
    gray16 = np.asarray(decode_image(messy_folder / "odd/gray16.png"))
    assert gray16.max() > 200 and gray16.min() < 10  # scaled from 16 bit, not clipped to white
    assert np.asarray(decode_image(messy_folder / "odd/palette_alpha.png")).shape == (40, 40, 3)


def test_decode_errors_say_why(messy_folder: Path) -> None:
    sample = FolderImages(messy_folder, ["broken/huge.png", "broken/empty.png"], 32, MAX_PIXELS)
    assert "exceeds the limit" in sample[0][2]
    assert "cannot identify" in sample[1][2] or "not an image" in sample[1][2]


@pytest.mark.parametrize("cache", ["off", "ram"])
def test_training_skips_exactly_the_broken_files(messy_folder: Path, tmp_path: Path, cache: str) -> None:
    out = tmp_path / f"run_{cache}"
    config = tiny_train_config(messy_folder, out, cache=cache, workers=1 if cache == "off" else 0, batch_size=8,
                               max_pixels=MAX_PIXELS, epochs=2)
    train(config)
    skipped = dict(line.split("\t", 1) for line in (out / "skipped.txt").read_text().splitlines())
    assert set(skipped) == BROKEN
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    trained_on = {checkpoint["files"][i] for i in range(len(checkpoint["files"])) if i not in checkpoint["skipped"]}
    assert trained_on >= ODD_VALID
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    n_all, n_valid = 32 + len(ODD_VALID) + len(BROKEN), 32 + len(ODD_VALID)
    # Streaming finds the broken files during epoch 1 (its batches shrink); the RAM cache knows them up front.
    first_epoch = n_all // 8 if cache == "off" else n_valid // 8
    assert [m["step"] for m in metrics] == [first_epoch, first_epoch + n_valid // 8]


def test_empty_folder_and_unreadable_only_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoImagesError, match="no image files"):
        train(tiny_train_config(tmp_path / "empty", tmp_path / "r1"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_text("nope")
    (bad / "b.png").write_bytes(b"")
    result = subprocess.run([sys.executable, "-m", "twist_core.cli", "train", str(bad), "--out", str(tmp_path / "r2"),
                             "--no-progress"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "could be" in result.stderr and "Traceback" not in result.stderr


def test_ground_truth_is_first_level_folder_only(messy_folder: Path) -> None:
    classes, labels = ground_truth_labels(["discs/a.png", "stripes/x/b.png", "c.png"])
    assert classes == ["", "discs", "stripes"] and labels.tolist() == [1, 2, 0]
