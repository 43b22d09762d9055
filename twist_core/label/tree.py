"""An ImageFolder-style tree ``DIR/<cluster name>/<file>`` of links (or copies) from a labels table.

torchvision's ``ImageFolder`` and FiftyOne's directory-tree importer read it as is. Images below
``min_confidence`` go to ``_uncertain``; error rows are left out.
"""

from __future__ import annotations

import os
import re
import shutil
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from twist_core.data.folder import TREE_MARKER
from twist_core.io_utils import mark_output_folder, path_from_text
from twist_core.label.table import Row

UNCERTAIN = "_uncertain"
MARKER = TREE_MARKER


def folder_names(class_names: list[str]) -> list[str]:
    """File-system-safe, distinct folder names for the clusters (cluster id appended on a clash)."""
    safe = []
    for name in class_names:
        cleaned = re.sub(r"[^\w.\- ]+", "_", name).strip(" .") or "cluster"
        safe.append(cleaned[:100])
    counts = Counter(name.lower() for name in safe)  # case-insensitive file systems too
    return [f"{name}-{i}" if counts[name.lower()] > 1 or name.lower() == UNCERTAIN else name
            for i, name in enumerate(safe)]


def file_names(paths: list[str]) -> dict[str, str]:
    """Each relative path's name in the tree: its base name, or the flattened path where base names repeat."""
    counts = Counter(Path(p).name.lower() for p in paths)
    names: dict[str, str] = {}
    taken: set[str] = set()
    for p in paths:
        name = Path(p).name if counts[Path(p).name.lower()] == 1 else p.replace("/", "__")
        stem, suffix, n = Path(name).stem, Path(name).suffix, 1
        while name.lower() in taken:  # a flattened path equal to another file's own name
            name, n = f"{stem}-{n}{suffix}", n + 1
        taken.add(name.lower())
        names[p] = name
    return names


def prepare_tree(tree: Path, overwrite: bool) -> None:
    """An empty folder to fill; a previous tree of ours is removed only with ``overwrite``."""
    if tree.exists() and any(tree.iterdir()):
        if not (tree / MARKER).exists():
            raise FileExistsError(f"--export-tree {tree} is not empty and was not written by twist label")
        if not overwrite:
            raise FileExistsError(f"--export-tree {tree} holds an earlier tree; --overwrite replaces it")
        shutil.rmtree(tree)
    tree.mkdir(parents=True, exist_ok=True)
    (tree / MARKER).write_text("written by twist label; safe to delete\n")
    mark_output_folder(tree)  # a tree inside the dataset is never scanned as new images


def write_tree(tree: Path, root: Path, rows: Iterable[Row], names: dict[str, str], class_folders: list[str],
               mode: str = "symlink", min_confidence: float = 0.0) -> Counter:
    """Link or copy every good row into its cluster folder; returns images per folder."""
    placed: Counter = Counter()
    for row in rows:
        if row["error"]:
            continue
        uncertain = row["confidence"] is not None and row["confidence"] < min_confidence
        folder = UNCERTAIN if uncertain else class_folders[row["cluster"]]
        path = path_from_text(row["path"])
        target = tree / folder / names[path]
        target.parent.mkdir(exist_ok=True)
        source = (root / path).resolve()
        if mode == "copy":
            shutil.copy2(source, target)
        else:
            os.symlink(source, target)
        placed[folder] += 1
    return placed
