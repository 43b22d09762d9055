"""Atomic writes: a reader (or a resumed run) sees the old file or the new one, never half of one."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; results are meant to be shared like any file
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def file_sha256(path: str | Path) -> str:
    """Hash of a file read in 1 MB blocks (models can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value: object) -> object:
    """Neutralise a text cell that a spreadsheet would run as a formula (``=``, ``+``, ``-``, ``@``, tab, CR).

    Prefixing a quote is what OWASP recommends: the cell shows the text as written and never executes.
    Numbers pass through unchanged, so a negative value stays a number; JSON/Parquet exports stay faithful.
    """
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


OUTPUT_MARKER = ".twist-output"


def mark_output_folder(folder: str | Path) -> None:
    """Leave a marker in a folder the project writes (run, index, thumbnails, export tree).

    Folder scans skip marked folders, so an index or export placed inside the dataset root is never
    taken for new images by ``twist index --update`` or ``twist label``.
    """
    marker = Path(folder) / OUTPUT_MARKER
    if not marker.exists():
        Path(folder).mkdir(parents=True, exist_ok=True)
        marker.write_text("written by twist: folder scans skip this folder\n")


def path_to_text(path: str) -> str:
    """A file name as table text, losslessly: bytes that are not UTF-8 (which Python holds as surrogates)
    become ``\\xNN`` and a backslash becomes ``\\\\``; every other name is written unchanged."""
    if "\\" not in path and not any("\udc80" <= char <= "\udcff" for char in path):
        return path
    return "".join("\\\\" if char == "\\" else f"\\x{ord(char) - 0xDC00:02x}" if "\udc80" <= char <= "\udcff"
                   else char for char in path)


def path_from_text(text: str) -> str:
    """The inverse of :func:`path_to_text`: the name to open (``os.fsencode`` of it gives the original bytes)."""
    if "\\" not in text:
        return text
    parts, i = [], 0
    while i < len(text):
        if text.startswith("\\\\", i):
            parts.append("\\")
            i += 2
        elif (text.startswith("\\x", i) and text[i + 2:i + 3] in tuple("89abcdef")
              and text[i + 3:i + 4] in tuple("0123456789abcdef")):
            parts.append(chr(0xDC00 + int(text[i + 2:i + 4], 16)))
            i += 4
        else:
            parts.append(text[i])
            i += 1
    return "".join(parts)


class StagedWrites:
    """Several outputs that appear together: each is written to a temporary file beside it, and only when all
    are written are they renamed into place, in order (the last one is the commit). A failure midway (a full
    disk) leaves the previous outputs as they were and no temporary file behind.

    ``with StagedWrites() as stage: stage(path, write)`` where ``write(tmp_path)`` fills the temporary file.
    """

    def __init__(self) -> None:
        self.staged: list[tuple[str, Path]] = []

    def __enter__(self) -> Callable[[str | Path, Callable[[str], None]], None]:
        return self.stage

    def stage(self, path: str | Path, write: Callable[[str], None]) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        self.staged.append((tmp, path))
        os.chmod(tmp, 0o666 & ~_UMASK)
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: object) -> None:
        if kind is not None:
            for tmp, _ in self.staged:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            return
        for tmp, path in self.staged:
            os.replace(tmp, path)
