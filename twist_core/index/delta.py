"""The FAISS side of a generation as a base plus the steps applied since, so an update writes what changed.

A generation folder holds ``index.faiss`` (the base) and, after updates, ``delta-NNNNNN.npz`` files, one per
update (N: the generation that wrote it), each holding the ids it removed, then the ids it added with their
codes: the index's own encoding of each vector (``sa_encode``: coarse list and 16-bit codes of the projection
for ``pcasq``, 258 B an image; the unit vector itself for the flat kind). An update's generation hard-links
the previous base and steps (files are never written in place, so a link is as good as a copy) and adds its
own step: a 1 % update at 1M writes 2.6 MB, not the 282 MB base. The writer and every reader
(:func:`read_index`) apply a step the same way (remove, then add the codes), so a reader holds the very lists
a full write would have given, and a replay costs a copy of codes (0.02 CPU-s for 10k images at 1M, where
encoding them again took 0.16). When the steps pass :data:`MERGE_SHARE` of the index's images, the update
writes the whole index as a new base instead.
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


def _coder(index: faiss.Index) -> faiss.Index | None:
    """The IVF index that takes encoded vectors (``add_sa_codes``), inside a projection or not; None when flat."""
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) else index
    return inner if isinstance(inner, faiss.IndexIVF) else None


@dataclass(frozen=True)
class Step:
    """One update's change to the FAISS index: ``removed`` ids go first, then ``ids`` come with their ``codes``."""

    removed: np.ndarray
    ids: np.ndarray
    codes: np.ndarray

    @classmethod
    def encode(cls, index: faiss.Index, removed: np.ndarray | None = None, ids: np.ndarray | None = None,
               vectors: np.ndarray | None = None) -> Step:
        """The step that removes ``removed`` from ``index`` and adds unit ``vectors`` as ``ids``."""
        ids = np.asarray(ids if ids is not None else [], np.int64)
        codes = np.zeros((0, 0), np.uint8)
        if len(ids):
            codes = index.sa_encode(vectors) if _coder(index) is not None else np.asarray(vectors, np.float32)
        return cls(np.asarray(removed if removed is not None else [], np.int64), ids, codes)

    @property
    def size(self) -> int:
        return len(self.removed) + len(self.ids)

    def apply(self, index: faiss.Index) -> None:
        """Change ``index`` as every writer and reader does, so they hold the same inverted lists."""
        if len(self.removed):
            index.remove_ids(self.removed)
        if len(self.ids):
            coder = _coder(index)
            if coder is None:
                index.add_with_ids(self.codes, self.ids)
            else:
                coder.add_sa_codes(self.codes, self.ids)
                index.ntotal = coder.ntotal  # a projection's wrapper counts what its IVF holds


def step_files(folder: Path) -> list[Path]:
    """The steps of a generation in the order they were applied."""
    return sorted(Path(folder).glob(STEP_GLOB))


def load_step(path: Path) -> Step:
    with np.load(path) as data:
        return Step(data["removed"], data["ids"], data["codes"])


def _step_size(path: Path) -> int:
    with np.load(path) as data:  # reads the two id arrays, not the codes
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
                    np.savez(handle, removed=step.removed, ids=step.ids, codes=step.codes)
            return
    faiss.write_index(index, str(folder / INDEX_FILE))
