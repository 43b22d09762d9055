"""The ``review`` table of an index: every image's "likely wrong" score (:mod:`twist_core.label.review`), kept
in the index's metadata so the app's Review view pages through it, and refreshed by ``twist index --update``
(new images change old images' neighbours)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from twist_core.index.metadata import IMAGES, IndexMetadata, commit_generation, meta_path, read_manifest
from twist_core.label.review import ReviewScores, ReviewSettings, score_index
from twist_core.layout import INDEX_FILE, META_FILE

VERSION = 1  # of the ``review`` table; an index whose table has another version is treated as having none
INFO_KEY = "review"
DEFAULT_SETTINGS = ReviewSettings()  # the measured weights
TABLE_SQL = """
CREATE TABLE IF NOT EXISTS review (id INTEGER PRIMARY KEY, score REAL NOT NULL, suggestion INTEGER);
CREATE INDEX IF NOT EXISTS review_by_score ON review (score DESC, id);
"""


def read_inputs(meta: IndexMetadata) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ids (sorted), predicted clusters and margins of the images that have a cluster."""
    found = meta.query(f"SELECT {IMAGES.id}, {IMAGES.cluster}, {IMAGES.margin} FROM {IMAGES.name} "
                        f"WHERE {IMAGES.cluster} IS NOT NULL ORDER BY {IMAGES.id}")
    ids = np.array([r[0] for r in found], np.int64)
    clusters = np.array([r[1] for r in found], np.int64)
    margins = np.array([np.nan if r[2] is None else r[2] for r in found], np.float32)
    return ids, clusters, margins


def write_table(meta: IndexMetadata, scores: ReviewScores, settings: ReviewSettings) -> None:
    """Replace the ``review`` table of a writable (unpublished) metadata copy."""
    meta.executescript(TABLE_SQL + "DELETE FROM review;")
    meta.executemany("INSERT INTO review (id, score, suggestion) VALUES (?, ?, ?)",
                      zip(scores.ids.tolist(), scores.score.astype(float).tolist(),
                          [None if s < 0 else s for s in scores.suggestion.tolist()], strict=True))
    meta.set_info({INFO_KEY: {"version": VERSION, "k": settings.k, "weighting": settings.weighting,
                               "neighbour_weight": settings.neighbour_weight,
                               "cluster_share": settings.cluster_share}})


def scorer(index: faiss.Index, ids: np.ndarray, rows: Sequence[dict[str, Any]],
           settings: ReviewSettings = DEFAULT_SETTINGS) -> Callable[[IndexMetadata], None]:
    """What a fresh build adds to its metadata: the scores of its images (``rows`` aligned with ``ids``)."""
    order = np.argsort(ids, kind="stable")
    clusters = np.array([-1 if rows[i].get("cluster") is None else rows[i]["cluster"] for i in order], np.int64)
    margins = np.array([np.nan if rows[i].get("margin") is None else rows[i]["margin"] for i in order], np.float32)
    sorted_ids = np.asarray(ids, np.int64)[order]
    scores = score_index(index, sorted_ids, clusters, margins, settings)
    labelled = clusters >= 0
    scores = ReviewScores(scores.ids[labelled], scores.score[labelled], scores.suggestion[labelled])
    return lambda meta: write_table(meta, scores, settings)


def refresh_index(index_dir: str | Path, settings: ReviewSettings = DEFAULT_SETTINGS) -> int:
    """Score every image of the index's current generation and publish the scores as the next generation.

    Uses FAISS on the stored vectors (approximate in an IVF-PQ index, as its searches are). Returns the
    number of images scored; a concurrent update wins (this raises ``IndexChangedError`` and changes nothing).
    """
    index_dir = Path(index_dir)
    manifest = read_manifest(index_dir)
    folder = index_dir / manifest["dir"]
    meta = IndexMetadata(folder / META_FILE)
    try:
        ids, clusters, margins = read_inputs(meta)
        cpu_index = faiss.read_index(str(folder / INDEX_FILE))
        nprobe = meta.info().get("nprobe")
        if nprobe and hasattr(cpu_index, "nprobe"):
            cpu_index.nprobe = int(nprobe)
        scores = score_index(cpu_index, ids, clusters, margins, settings)

        def write_meta(path: Path, generation: int) -> None:
            copy = meta.copy_to(path)
            write_table(copy, scores, settings)
            copy.set_info({"generation": generation})
            copy.commit()
            copy.close()

        commit_generation(index_dir, cpu_index, write_meta, expected=manifest["generation"])
    finally:
        meta.close()
    return len(ids)


def index_has_scores(index_dir: str | Path) -> bool:
    """Whether the current generation of an index holds review scores of this version."""
    meta = meta_path(index_dir)
    db = sqlite3.connect(f"file:{meta}?mode=ro", uri=True)
    try:
        return has_scores(db)
    finally:
        db.close()


def has_scores(db: sqlite3.Connection, schema: str = "main") -> bool:
    """Whether a metadata database holds a review table of this version (older indexes have none)."""
    found = db.execute(f"SELECT value FROM {schema}.info WHERE key = ?", (INFO_KEY,)).fetchall()
    if not found:
        return False
    info: dict[str, Any] = json.loads(found[0][0])
    return info.get("version") == VERSION
