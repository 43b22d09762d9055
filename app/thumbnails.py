"""Thumbnail cache: each image is decoded and shrunk once into ``THUMBS/<id>.jpg``, then served as a file.

Index ids are never reused (a replaced image gets a new id), so a thumbnail never goes stale. Files are
written under a temporary name and renamed, so concurrent requests for one image never see half a file.
Unreadable images get a grey placeholder, so one broken file does not break a gallery page.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from PIL import Image

from twist_core.folder import ImageReadError, decode_image

PLACEHOLDER = "_unreadable.jpg"


class ThumbnailCache:
    """``path(id, source)`` returns the cached thumbnail of an image, making it on first use."""

    def __init__(self, folder: Path, size: int = 160, max_pixels: int = 100_000_000) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.size = size
        self.max_pixels = max_pixels

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
