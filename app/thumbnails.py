"""Thumbnail cache: each image is decoded and shrunk once into ``THUMBS/<id>.jpg``, then served as a file.

Index ids are never reused (a replaced or changed image gets a new id, a rebuild keeps the ids of unchanged
files), so a thumbnail never goes stale. The cache belongs to one index lineage (``owner``, the index's
uid) and one way of making thumbnails (size and ``RECIPE``): opened for another index, whose ids mean other
images, or with another size or recipe (a state folder from an older release), it starts empty. Files are
written under a temporary name and renamed, so concurrent requests for one image never see half a file.
Unreadable images get a grey placeholder, so one broken file does not break a gallery page. Images smaller
than the thumbnail size are enlarged by a whole factor with nearest-neighbour sampling (pixels stay sharp).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from PIL import Image

from twist_core.data.folder import ImageReadError, decode_image
from twist_core.io_utils import mark_output_folder

PLACEHOLDER = "_unreadable.jpg"
OWNER_FILE = ".index-uid"  # the uid of the index whose ids name these thumbnails, and how they were made
RECIPE = 2  # raise it whenever how a thumbnail is made changes (2: small images enlarged sharply)


class ThumbnailCache:
    """``path(id, source)`` returns the cached thumbnail of an image, making it on first use."""

    def __init__(self, folder: Path, size: int = 160, max_pixels: int = 100_000_000,
                 owner: str | None = None) -> None:
        self.folder = Path(folder)
        mark_output_folder(self.folder)
        self.size = size
        self.max_pixels = max_pixels
        if owner is not None:
            self._claim(owner)

    def _claim(self, owner: str) -> None:
        """Drop thumbnails made for another index (their ids name other images) or in another way (size or
        recipe), then record ``owner`` with the way."""
        record = self.folder / OWNER_FILE
        claim = f"{owner} {self.size}px recipe-{RECIPE}"
        if record.is_file() and record.read_text().strip() == claim:
            return
        for stale in [*self.folder.glob("*.jpg"), *self.folder.glob("*/*.jpg")]:
            stale.unlink(missing_ok=True)
        tmp = record.with_name(f".{OWNER_FILE}.{os.getpid()}")
        tmp.write_text(claim + "\n")
        os.replace(tmp, record)

    def _placeholder(self) -> Path:
        path = self.folder / PLACEHOLDER
        if not path.is_file():
            self._save(Image.new("RGB", (self.size, self.size), (200, 200, 200)), path)
        return path

    @staticmethod
    def _save(image: Image.Image, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
        image.save(tmp, "JPEG", quality=85)
        os.replace(tmp, path)

    def path(self, image_id: int, source: Path) -> Path:
        target = self.folder / f"{int(image_id)}.jpg"
        if target.is_file():
            return target
        try:
            image = decode_image(source, self.max_pixels, draft_size=self.size)
        except ImageReadError:
            return self._placeholder()
        image.thumbnail((self.size, self.size), Image.Resampling.BICUBIC)
        factor = self.size // max(image.size)
        if factor > 1:  # a small image: sharp squares, not a blur when the browser scales it up
            image = image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
        self._save(image, target)
        return target

    def warm(self, items: Iterable[tuple[int, Path]], stop: Callable[[], bool] = lambda: False) -> int:
        """Make the thumbnails of ``items`` ahead of time (a background thread); returns how many were made."""
        made = 0
        for image_id, source in items:
            if stop():
                break
            if not (self.folder / f"{int(image_id)}.jpg").is_file():
                self.path(image_id, source)
                made += 1
        return made
