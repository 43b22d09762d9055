"""The labels table read as a stream, for an index of millions of images: one pass keeps only arrays (row
positions, ids, clusters, margins, fingerprints), never a dict per row; the rows are read again in chunks when
the metadata is written, and the vectors are read from the embeddings file chunk by chunk."""

from __future__ import annotations

from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from twist_core.index.metadata import IndexUserError, file_fingerprint
from twist_core.io_utils import path_from_text
from twist_core.label.table import (
    LabelsTableError,
    csv_row,
    iter_labels,
    labels_paths,
    read_labels_meta,
    table_format,
)
from twist_core.vectors import normalized

CHUNK = 50_000  # rows per chunk: a chunk of float32 1,024-d vectors is 200 MB


class EmbeddingRows:
    """Rows of a ``.npy`` matrix read with ``pread``: unlike a memory map, pages read once do not stay in the
    process's RSS (a 1M-image float16 table is 2 GB)."""

    def __init__(self, path: Path) -> None:
        mapped = np.load(path, mmap_mode="r")
        if mapped.ndim != 2 or not mapped.flags.c_contiguous:
            raise LabelsTableError(f"{path} has shape {mapped.shape}, expected one row per table row")
        self.path, self.shape, self.dtype, self.offset = path, mapped.shape, mapped.dtype, mapped.offset
        self.row_bytes = self.shape[1] * self.dtype.itemsize
        del mapped

    def __len__(self) -> int:
        return self.shape[0]

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """The rows at ``positions`` (ascending), one read per run of consecutive rows."""
        out = np.empty((len(positions), self.shape[1]), self.dtype)
        breaks = np.flatnonzero(np.diff(positions) != 1) + 1
        with open(self.path, "rb") as handle:
            for run in np.split(np.arange(len(positions)), breaks):
                if len(run):
                    handle.seek(self.offset + int(positions[run[0]]) * self.row_bytes)
                    handle.readinto(memoryview(out[run[0]:run[-1] + 1]).cast("B"))
        return out


@dataclass
class TableScan:
    """What one pass over a table keeps: its usable rows' table positions and the arrays the index needs."""

    table: Path
    meta: dict[str, Any]
    embeddings: EmbeddingRows  # one row per table row (error rows included)
    positions: np.ndarray  # table rows that were labelled
    ids: np.ndarray
    clusters: np.ndarray  # -1: none
    margins: np.ndarray
    fingerprints: list[str | None]


def open_table(table: Path) -> tuple[EmbeddingRows, dict[str, Any]]:
    """The embeddings and the ``.meta.json`` of a labels table, checked to exist."""
    if not table.is_file():
        raise LabelsTableError(f"labels table {table} not found")
    embeddings_path, meta_path = labels_paths(table)
    if not embeddings_path.is_file():
        raise LabelsTableError(f"{embeddings_path} not found: index needs the embeddings twist label saves "
                               "beside the table")
    meta = read_labels_meta(table)
    if "root" not in meta:
        raise LabelsTableError(f"{meta_path} (with the folder root) is missing; label the folder again")
    return EmbeddingRows(embeddings_path), meta


def usable_chunks(table: Path, chunk: int = CHUNK) -> Iterator[tuple[np.ndarray, list[dict[str, Any]]]]:
    """(table positions, rows) of the labelled rows, ``chunk`` table rows at a time."""
    rows = iter_labels(table)
    start = 0
    while block := list(islice(rows, chunk)):
        good = [i for i, row in enumerate(block) if not row.get("error")]
        yield np.array(good, np.int64) + start, [block[i] for i in good]
        start += len(block)


def new_rows(table: Path, known: Callable[[list[str]], Container[str]],
             chunk: int = CHUNK) -> Iterator[tuple[np.ndarray, list[dict[str, Any]]]]:
    """(table positions, rows) of the labelled rows whose path ``known`` (asked a chunk of paths at a time) does
    not hold; a CSV table is read column-wise and only these rows typed (a full 1M-row table: seconds)."""
    if table_format(table) != ".csv":
        for positions, rows in usable_chunks(table, chunk):
            found = known([row["path"] for row in rows])
            fresh = [i for i, row in enumerate(rows) if row["path"] not in found]
            yield positions[fresh], [rows[i] for i in fresh]
        return
    import pandas as pd  # its C reader: a 1M-row table in about a second, the csv module takes five

    start = 0
    for block in pd.read_csv(table, dtype=str, keep_default_na=False, chunksize=chunk):
        raw = block["path"]
        paths = raw.where(~raw.str.startswith("'"), raw.str[1:])  # csv_text, on the whole column
        good = (block["error"] == "") if "error" in block else pd.Series(True, index=block.index)
        listed = paths.tolist()
        found = known([path for path, ok in zip(listed, good.tolist(), strict=True) if ok])
        indexed = np.fromiter((path in found for path in listed), bool, len(listed))
        fresh = np.flatnonzero(good.to_numpy() & ~indexed)
        header = list(block.columns)
        yield fresh + start, [csv_row(header, cells) for cells in block.iloc[fresh].to_numpy().tolist()]
        start += len(block)


def scan_table(table: Path, assign: Callable[[list[dict[str, Any]]], np.ndarray]) -> TableScan:
    """One pass over ``table``: each labelled row's fingerprint (``assign`` sets it and returns the row's id)."""
    embeddings, meta = open_table(table)
    positions, ids, clusters, margins, fingerprints, total = [], [], [], [], [], 0
    keys: list[np.ndarray] = []
    for chunk_positions, rows in usable_chunks(table):
        root = Path(meta["root"])
        keys.append(np.fromiter((hash(row["path"]) for row in rows), np.int64, len(rows)))
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
    refuse_repeated_paths(table, np.concatenate(keys))
    if total > len(embeddings):
        raise LabelsTableError(f"{labels_paths(table)[0]} has shape {embeddings.shape}, expected one row per "
                               f"table row (at least {total})")
    return scan


def refuse_repeated_paths(table: Path, keys: np.ndarray) -> None:
    """One line before any training when a path is in two rows (the index holds a path once): ``keys`` are the
    rows' path hashes in table order; equal hashes are checked on the paths themselves."""
    ordered = np.sort(keys)
    repeated = set(ordered[1:][ordered[1:] == ordered[:-1]].tolist())
    if not repeated:
        return
    seen: set[str] = set()
    for _, rows in usable_chunks(table):
        for row in rows:
            if hash(row["path"]) in repeated:
                if row["path"] in seen:
                    raise LabelsTableError(f"{table}: {row['path']} is in two rows; a table lists each image "
                                           "once (label the folder again, or drop the repeated row)")
                seen.add(row["path"])


def vectors_at(embeddings: EmbeddingRows | np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Unit float32 vectors of some table rows (ascending positions)."""
    vectors = normalized(embeddings.rows(positions) if isinstance(embeddings, EmbeddingRows) else embeddings[positions])
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
