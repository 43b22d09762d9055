"""The Batch tab's inputs: uploaded images and zips of images, opened lazily and decoded only as large as needed.

A zip of a few hundred KB can hold images of tens of millions of pixels each. So the images of a request are
first sized from their headers (nothing decoded) and refused together past a pixel budget; then each is
decoded on its own, shrunk to the model's input scale at once (JPEG decodes at a reduced scale; other formats
are reduced by an integer factor straight after decoding) and predicted in chunks, so one huge image at most
is ever held at full size.
"""

from __future__ import annotations

import contextlib
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from PIL import Image, ImageOps

from twist_core.data.folder import IMAGE_EXTENSIONS, ImageReadError, to_rgb

MAX_MEMBER_BYTES = 50 << 20  # an image inside a zip larger than this is reported, not read


class BatchUserError(Exception):
    """The batch as a whole cannot be labelled (too many images, too many pixels); the message says why."""


@dataclass(frozen=True)
class BatchItem:
    """One image of a batch: its name, how to open it (a path or a stream), or why it cannot be used."""

    name: str
    source: Callable[[], str | Path | IO[bytes]] | None
    error: str = ""


def batch_items(files: Sequence[str | Path], zips: contextlib.ExitStack, max_images: int) -> list[BatchItem]:
    """Every uploaded image and every image inside an uploaded zip (zips stay open in ``zips``)."""
    items: list[BatchItem] = []
    for file in files:
        path = Path(file)
        if not zipfile.is_zipfile(path):
            items.append(BatchItem(path.name, lambda path=path: path))
            continue
        archive = zips.enter_context(zipfile.ZipFile(path))
        for member in archive.infolist():
            if member.is_dir() or Path(member.filename).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            if member.file_size > MAX_MEMBER_BYTES:
                items.append(BatchItem(member.filename, None, f"larger than {MAX_MEMBER_BYTES >> 20} MB"))
            else:
                items.append(BatchItem(member.filename, lambda a=archive, m=member: a.open(m)))
        if len(items) > max_images:
            break
    if len(items) > max_images:
        raise BatchUserError(f"at most {max_images} images per batch")
    return items


def header_pixels(item: BatchItem) -> int:
    """Width x height from the image's header (0 when unreadable: decoding reports that one later)."""
    if item.source is None:
        return 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(item.source()) as image:
                return image.width * image.height
    except Exception:  # any unreadable file: its row gets the decoder's reason
        return 0


def check_pixel_budget(items: Sequence[BatchItem], max_pixels: int, max_image_pixels: int) -> None:
    """Refuse the batch when its images, all together, hold more than ``max_pixels``.

    Images over the per-image limit do not count: they are refused one by one without being decoded.
    """
    total = sum(p for p in map(header_pixels, items) if p <= max_image_pixels)
    if total > max_pixels:
        raise BatchUserError(f"these {len(items)} images hold {total:,} pixels in all; one batch may decode at "
                             f"most {max_pixels:,}: send fewer or smaller images")


def shrink(image: Image.Image, factor: int) -> Image.Image:
    """``image`` made ``factor`` times smaller (box average; nearest pixel for modes ``reduce`` lacks)."""
    if factor <= 1:
        return image
    if image.mode in ("1", "P", "I;16", "I;16B", "I;16L", "I;16N"):
        return image.resize((image.width // factor, image.height // factor), Image.Resampling.NEAREST)
    return image.reduce(factor)


def decode_small(source: Any, max_pixels: int, size: int) -> Image.Image:
    """Decode an image no larger than a ``size`` px model input needs (its shorter side stays >= ``size``)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(source) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageReadError(f"{width}x{height} = {width * height:,} pixels exceeds the limit of "
                                         f"{max_pixels:,}")
                if width == 0 or height == 0:
                    raise ImageReadError("image has zero width or height")
                if image.format == "JPEG":
                    image.draft("RGB", (size, size))
                image.load()
                return to_rgb(ImageOps.exif_transpose(shrink(image, min(image.size) // size)))
    except ImageReadError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageReadError("not an image Pillow can identify (corrupt, empty or wrong extension)") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError, zipfile.BadZipFile) as error:
        raise ImageReadError(f"cannot decode: {str(error) or type(error).__name__}") from None
