"""The FAISS side of a generation as a base plus the steps applied since, so an update writes what changed.

A generation folder holds ``index.faiss`` (the base) and, after updates, ``delta-NNNNNN.npz`` files, one per
update (N: the generation that wrote it), each holding the ids it removed, then the ids it added with their
unit vectors. An update's generation hard-links the previous base and steps (files are never written in
place, so a link is as good as a copy) and adds its own step: a 1 % update at 1M writes 20 MB, not the 284 MB
base. Every reader goes through :func:`read_index`, which replays the steps in order exactly as the writer
applied them (remove, then add), so it holds the very index a full write would have given. When the steps
pass :data:`MERGE_SHARE` of the index's images, the update writes the whole index as a new base instead.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from twist_core.layout import INDEX_FILE

MERGE_SHARE = 0.10  # steps holding more images (added or removed) than this share of the index: write it whole
STEP_GLOB = "delta-*.npz"


@dataclass(frozen=True)
class Step:
    """One update's change to the FAISS index: ``removed`` ids go first, then ``ids`` come with ``vectors``."""

    removed: np.ndarray
    ids: np.ndarray
    vectors: np.ndarray

    @classmethod
    def of(cls, dim: int, removed: np.ndarray | None = None, ids: np.ndarray | None = None,
           vectors: np.ndarray | None = None) -> Step:
        """A step with int64 ids and float32 vectors; what is not given is empty."""
        return cls(np.asarray(removed if removed is not None else [], np.int64),
                   np.asarray(ids if ids is not None else [], np.int64),
                   np.asarray(vectors if vectors is not None else np.zeros((0, dim)), np.float32))

    @property
    def size(self) -> int:
        return len(self.removed) + len(self.ids)

    def apply(self, index: faiss.Index) -> None:
        """Change ``index`` the way every writer does, so a replay gives the same inverted lists."""
        if len(self.removed):
            index.remove_ids(self.removed)
        if len(self.ids):
            index.add_with_ids(self.vectors, self.ids)


def step_files(folder: Path) -> list[Path]:
    """The steps of a generation in the order they were applied."""
    return sorted(Path(folder).glob(STEP_GLOB))


def load_step(path: Path) -> Step:
    with np.load(path) as data:
        return Step(data["removed"], data["ids"], data["vectors"])


def _step_size(path: Path) -> int:
    with np.load(path) as data:  # reads the two id arrays, not the vectors
        return len(data["removed"]) + len(data["ids"])


def read_index(folder: Path) -> faiss.Index:
    """The generation's FAISS index: its base with every step replayed in memory."""
    index = faiss.read_index(str(Path(folder) / INDEX_FILE))
    for path in step_files(folder):
        load_step(path).apply(index)
    return index


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # a file system without hard links (or past its link count)
        shutil.copyfile(source, target)


def write_index(folder: Path, index: faiss.Index, previous: Path | None, step: Step | None,
                generation: int) -> None:
    """Write the FAISS side of a new generation into ``folder``: a link to the last base and a step, or whole.

    With the ``previous`` generation's folder and the ``step`` that turned its index into ``index``, it links that
    base and its steps and saves ``step`` beside them, unless the steps would pass :data:`MERGE_SHARE`.
    """
    if previous is not None and step is not None and (previous / INDEX_FILE).is_file():
        steps = step_files(previous)
        if sum(map(_step_size, steps)) + step.size <= MERGE_SHARE * max(index.ntotal, 1):
            for path in [previous / INDEX_FILE, *steps]:
                _link_or_copy(path, folder / path.name)
            if step.size:
                with open(folder / f"delta-{generation:06d}.npz", "wb") as handle:
                    np.savez(handle, removed=step.removed, ids=step.ids, vectors=step.vectors)
            return
    faiss.write_index(index, str(folder / INDEX_FILE))
