"""Find the images in a folder and decode any of them to RGB, or say in words why it cannot be read.

Training never looks at folder names; :func:`ground_truth_labels` exists for evaluation only.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from twist_core.errors import UserError
from twist_core.io_utils import OUTPUT_MARKER
from twist_core.layout import CHECKPOINT_FILE, CONFIG_FILE, CURATION_FILE, META_FILE

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
SYSTEM_NAMES = frozenset({"thumbs.db", "desktop.ini", "__macosx", "@eadir", "$recycle.bin", "lost+found"})
DEFAULT_MAX_PIXELS = 100_000_000
TREE_MARKER = ".twist-tree"  # written by ``twist label --export-tree`` before the generic marker existed
DRAFT_GAP = 2  # JPEG draft decoding keeps at least this many pixels per pixel of the size asked for

# We enforce our own pixel limit (with a clear message) before decoding; PIL's global one would only warn.
Image.MAX_IMAGE_PIXELS = None


class ImageReadError(UserError):
    """An image that cannot be used; the message says why in words."""


class NoImagesError(UserError):
    """The folder holds nothing we can train on or label."""


def _is_hidden_or_system(name: str) -> bool:
    return name.startswith(".") or name.lower() in SYSTEM_NAMES


def is_project_output(names: Iterable[str]) -> bool:
    """Whether a folder holding these file names was written by twist (run, index, app state, export tree).

    Marked folders are recognised by :data:`OUTPUT_MARKER`; older ones by the state files they hold. Their images
    (thumbnails, curves, exported copies) must never be taken for new images of the dataset around them.
    """
    present = set(names)
    return (bool(present & {OUTPUT_MARKER, TREE_MARKER, META_FILE, CURATION_FILE})
            or {CHECKPOINT_FILE, CONFIG_FILE} <= present)


def scan_folder(root: str | Path, unreadable: dict[str, str] | None = None) -> list[str]:
    """Relative POSIX paths of all image files below ``root``, sorted, following symlinks without looping.

    Hidden and system files and folders are ignored, and so are folders twist wrote (:func:`is_project_output`);
    extensions match in any letter case. Subfolders that cannot be listed are added to ``unreadable``
    (relative path -> reason) so the caller can tell the user instead of silently missing their images.
    """
    root = Path(root)
    if not root.is_dir():
        raise NoImagesError(f"{root} is not a folder")
    found: list[str] = []
    seen_dirs: set[str] = set()
    failed: dict[str, str] = {}

    def note_unreadable(error: OSError) -> None:
        relative = Path(os.path.relpath(error.filename or root, root)).as_posix()
        failed[relative] = f"cannot read this folder: {(error.strerror or str(error)).lower()}"

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=note_unreadable):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # a symlink loop or a second link to a folder already walked
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir != "." and is_project_output(filenames):  # the root itself is scanned as asked
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden_or_system(d))
        for name in filenames:
            if _is_hidden_or_system(name) or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            full = os.path.join(dirpath, name)
            if not os.path.isfile(full):  # broken symlink, fifo, ...
                continue
            found.append(name if rel_dir == "." else Path(rel_dir, name).as_posix())
    if "." in failed:
        raise NoImagesError(f"{root}: {failed['.']}")
    if unreadable is not None:
        unreadable.update(failed)
    found.sort()
    return found


def require_images(root: str | Path, unreadable: dict[str, str] | None = None) -> list[str]:
    files = scan_folder(root, unreadable)
    if not files:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise NoImagesError(f"no image files in {root} (looked recursively for {exts}, any letter case)")
    return files


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and float greyscale scaled to 0-255 (``convert('L')`` would clip them to white)."""
    array = np.asarray(image)
    if image.mode.startswith("I;16") or (image.mode == "I" and array.max(initial=0) > 255):
        scaled = array.astype(np.float32) / (65535.0 if array.max(initial=0) > 255 or "16" in image.mode else 255.0)
    elif image.mode == "F":
        low, high = float(array.min(initial=0.0)), float(array.max(initial=1.0))
        scaled = (array - low) / max(high - low, 1e-12)
    else:
        scaled = array.astype(np.float32) / 255.0
    return Image.fromarray(np.clip(scaled * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited over ``background``."""
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        image = _to_8bit(image)
    if image.mode in ("LA", "RGBa", "La", "PA") or (image.mode == "L" and "transparency" in image.info):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        canvas = Image.new("RGB", image.size, background)
        canvas.paste(image, mask=image.getchannel("A"))
        return canvas
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None) -> Image.Image:
    """Open, orient (EXIF) and convert one image to RGB.

    ``draft_size`` lets JPEG decode at a reduced scale when only a small version is needed.
    Raises :class:`ImageReadError` with a reason for anything unusable.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's EXIF/ICC chatter; real failures raise below
            with Image.open(path) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageReadError(
                        f"{width}x{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,} "
                        "(raise --max-pixels if the image is trusted)"
                    )
                if width == 0 or height == 0:
                    raise ImageReadError("image has zero width or height")
                if draft_size and image.format == "JPEG":
                    # DCT scaling to >= twice the size asked for, as Pillow's thumbnail does: the resize after it
                    # still averages 2+ pixels per output pixel, so the result stays close to a full decode.
                    image.draft("RGB", (DRAFT_GAP * draft_size, DRAFT_GAP * draft_size))
                image.load()
                image = ImageOps.exif_transpose(image)
                return to_rgb(image)
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise ImageReadError("file not found (deleted after the scan?)") from None
    except PermissionError:
        raise ImageReadError("permission denied") from None
    except Image.UnidentifiedImageError:
        raise ImageReadError("not an image Pillow can identify (corrupt, empty or wrong extension)") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as error:
        reason = str(error) or type(error).__name__
        raise ImageReadError(f"cannot decode: {reason}") from None


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size``, then the central ``size`` x ``size`` square."""
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def skipped_lines(unreadable: dict[str, str]) -> list[str]:
    """``skipped.txt`` lines (``path<TAB>reason``) for the folders a scan could not read, a folder ending in /."""
    return [f"{folder}/\t{reason}" for folder, reason in sorted(unreadable.items())]


def ground_truth_labels(files: list[str]) -> tuple[list[str], np.ndarray]:
    """Class names from the first-level subfolder of each path (evaluation only, never training)."""
    first = [f.split("/", 1)[0] if "/" in f else "" for f in files]
    classes = sorted(set(first))
    lookup = {name: i for i, name in enumerate(classes)}
    return classes, np.array([lookup[c] for c in first], dtype=np.int64)
