"""The labels table read as a stream, for an index of millions of images: one pass keeps only arrays (row
positions, ids, clusters, margins, fingerprints), never a dict per row; the rows are read again in chunks when
the metadata is written, and the vectors come from the memory-mapped embeddings chunk by chunk."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from twist_core.index.metadata import IndexUserError, file_fingerprint
from twist_core.io_utils import path_from_text
from twist_core.label.table import LabelsTableError, iter_labels, labels_paths, read_labels_meta
from twist_core.vectors import normalized

CHUNK = 50_000  # rows per chunk: a chunk of float32 1,024-d vectors is 200 MB


@dataclass
class TableScan:
    """What one pass over a table keeps: its usable rows' table positions and the arrays the index needs."""

    table: Path
    meta: dict[str, Any]
    embeddings: np.ndarray  # memory-mapped, one row per table row (error rows included)
    positions: np.ndarray  # table rows that were labelled
    ids: np.ndarray
    clusters: np.ndarray  # -1: none
    margins: np.ndarray
    fingerprints: list[str | None]


def open_table(table: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """The memory-mapped embeddings and the ``.meta.json`` of a labels table, checked to exist."""
    if not table.is_file():
        raise LabelsTableError(f"labels table {table} not found")
    embeddings_path, meta_path = labels_paths(table)
    if not embeddings_path.is_file():
        raise LabelsTableError(f"{embeddings_path} not found: index needs the embeddings twist label saves "
                               "beside the table")
    meta = read_labels_meta(table)
    if "root" not in meta:
        raise LabelsTableError(f"{meta_path} (with the folder root) is missing; label the folder again")
    embeddings = np.load(embeddings_path, mmap_mode="r")
    if embeddings.ndim != 2:
        raise LabelsTableError(f"{embeddings_path} has shape {embeddings.shape}, expected one row per table row")
    return embeddings, meta


def usable_chunks(table: Path, chunk: int = CHUNK) -> Iterator[tuple[np.ndarray, list[dict[str, Any]]]]:
    """(table positions, rows) of the labelled rows, ``chunk`` table rows at a time."""
    rows = iter_labels(table)
    start = 0
    while block := list(islice(rows, chunk)):
        good = [i for i, row in enumerate(block) if not row.get("error")]
        yield np.array(good, np.int64) + start, [block[i] for i in good]
        start += len(block)


def scan_table(table: Path, assign: Callable[[list[dict[str, Any]]], np.ndarray]) -> TableScan:
    """One pass over ``table``: each labelled row's fingerprint (``assign`` sets it and returns the row's id)."""
    embeddings, meta = open_table(table)
    positions, ids, clusters, margins, fingerprints, total = [], [], [], [], [], 0
    for chunk_positions, rows in usable_chunks(table):
        root = Path(meta["root"])
        for row in rows:
            row["fingerprint"] = file_fingerprint(root / path_from_text(row["path"]))
        positions.append(chunk_positions)
        ids.append(assign(rows))
        clusters.append(np.array([-1 if r["cluster"] is None else r["cluster"] for r in rows], np.int64))
        margins.append(np.array([np.nan if r["margin"] is None else r["margin"] for r in rows], np.float32))
        fingerprints += [r["fingerprint"] for r in rows]
        total = int(chunk_positions[-1]) + 1 if len(chunk_positions) else total
    scan = TableScan(table, meta, embeddings, *(np.concatenate(a) if a else np.zeros(0, np.int64)
                                                 for a in (positions, ids, clusters, margins)), fingerprints)
    if not len(scan.positions):
        raise LabelsTableError(f"{table} has no successfully labelled images")
    if total > len(embeddings):
        raise LabelsTableError(f"{labels_paths(table)[0]} has shape {embeddings.shape}, expected one row per "
                               f"table row (at least {total})")
    return scan


def vectors_at(embeddings: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Unit float32 vectors of some table rows (a slice when contiguous: no fancy-index copy of the map)."""
    if len(positions) and positions[-1] - positions[0] == len(positions) - 1:
        block = embeddings[positions[0]:positions[-1] + 1]
    else:
        block = embeddings[positions]
    vectors = normalized(block)
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        raise IndexUserError(f"the embeddings hold non-finite values (NaN or inf), first in table row "
                             f"{int(positions[np.flatnonzero(bad)[0]]) + 1}; check the model and label the "
                             "folder again")
    return vectors


def vector_chunks(scan: TableScan, chunk: int = CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, unit vectors) of the scanned rows, ``chunk`` at a time."""
    for start in range(0, len(scan.positions), chunk):
        yield scan.ids[start:start + chunk], vectors_at(scan.embeddings, scan.positions[start:start + chunk])
