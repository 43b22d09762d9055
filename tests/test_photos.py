"""Photo folders: JPEG draft decoding stays faithful, and the CPU default for photos beats k-means on pixels."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA, extract_cifar_slice
from PIL import Image, JpegImagePlugin

from twist_core.dataset import FolderImages
from twist_core.folder import DRAFT_GAP, decode_image, resize_center_crop
from twist_core.infer import Preprocess

CALTECH = SHARED_DATA / "caltech20.tar.gz"


@pytest.fixture(scope="module")
def caltech_slice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 24 photos of each of the 20 caltech20 classes (480 photos)."""
    return extract_cifar_slice(tmp_path_factory.mktemp("caltech"), per_class=24, archive=CALTECH)


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def noisy_photo(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:height, 0:width]
    shading = 128 + 80 * np.sin(xx / 90.0)[..., None] * np.cos(yy / 70.0)[..., None] * np.ones(3)
    return Image.fromarray(np.clip(shading + rng.normal(0, 10, (height, width, 3)), 0, 255).astype(np.uint8))


def test_draft_decodes_jpeg_only_and_keeps_twice_the_size_asked_for(tmp_path: Path) -> None:
    photo = noisy_photo(1200, 900)
    (tmp_path / "photo.jpg").write_bytes(jpeg_bytes(photo))
    photo.save(tmp_path / "photo.png")
    assert decode_image(tmp_path / "photo.png", draft_size=64).size == (1200, 900)  # no draft mode for PNG
    assert decode_image(tmp_path / "photo.jpg").size == (1200, 900)
    reduced = decode_image(tmp_path / "photo.jpg", draft_size=64)
    assert reduced.size == (300, 225)  # scale 1/4: the largest DCT scale whose shorter side stays >= 2 x 64
    assert min(decode_image(tmp_path / "photo.jpg", draft_size=256).size) >= DRAFT_GAP * 256


def test_training_and_labelling_decode_jpegs_in_draft_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A spy on Pillow's real JPEG draft records what each path asks for (the decode itself still runs)."""
    (tmp_path / "photo.jpg").write_bytes(jpeg_bytes(noisy_photo(1600, 1200)))
    requested: list[tuple[int, int]] = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self: JpegImagePlugin.JpegImageFile, mode: str | None, size: tuple[int, int]) -> object:
        requested.append(size)
        return real_draft(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    _, image, error = FolderImages(tmp_path, ["photo.jpg"], 64)[0]
    assert error == "" and tuple(image.shape) == (3, 64, 64)
    preprocess = Preprocess(224, 256, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert preprocess.crop(preprocess.load(tmp_path / "photo.jpg")).shape == (224, 224, 3)
    assert requested == [(DRAFT_GAP * 64,) * 2, (DRAFT_GAP * 256,) * 2]


def test_draft_decoding_gives_nearly_the_pixels_of_a_full_decode(caltech_slice: Path, tmp_path: Path) -> None:
    """Real photos enlarged 5x (1,100-1,500 px, as phone photos are to a 64 px model), then both paths compared.

    Tolerance: mean absolute difference over the photos below 2.5 grey levels at 64 px and 1.5 at 256 px; for
    scale, resizing the same full decode with bilinear instead of bicubic differs by 2.2 and 1.2. A draft at the
    size asked for itself (no 2x margin) differed by 3.0 and 2.7 on the same photos.
    """
    photos = sorted(caltech_slice.rglob("*.jpg"))[::24]
    for index, path in enumerate(photos):
        with Image.open(path) as image:
            large = image.convert("RGB").resize((image.width * 5, image.height * 5), Image.Resampling.LANCZOS)
        (tmp_path / f"{index}.jpg").write_bytes(jpeg_bytes(large))
    for size, tolerance in ((64, 2.5), (256, 1.5)):
        differences = []
        for index in range(len(photos)):
            full = np.asarray(resize_center_crop(decode_image(tmp_path / f"{index}.jpg"), size), dtype=np.float32)
            draft = resize_center_crop(decode_image(tmp_path / f"{index}.jpg", draft_size=size), size)
            assert draft.size == (size, size)
            differences.append(np.abs(np.asarray(draft, dtype=np.float32) - full).mean())
        assert np.mean(differences) < tolerance, (size, differences)
