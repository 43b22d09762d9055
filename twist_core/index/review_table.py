"""The ``review`` table of an index: every image's "likely wrong" score (:mod:`twist_core.label.review`), kept
in the index's metadata so the app's Review view pages through it.

``twist index --update`` re-scores only what changed: the new images, and the old images whose neighbour list
a new or removed image enters or leaves. Each row keeps its k-th neighbour's similarity (``kth``); an old image x
found among the ``AFFECT_K`` nearest of a new (or removed) image y is re-scored when sim(x, y) >= x's ``kth``.
The cluster term uses each cluster's mean doubt as recorded in the table's info; it is moved (every score of
the cluster shifted in SQL) only when the update changes a mean by more than ``MEAN_TOLERANCE``, so a score
differs from a full re-score by at most (1 - w_n) s ``MEAN_TOLERANCE`` = 0.0023 from that term."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from twist_core.index.delta import Step, read_index
from twist_core.index.metadata import IMAGES, IndexMetadata, chunked_in, commit_generation, meta_path, read_manifest
from twist_core.index.progress import Stages
from twist_core.index.stream import TableScan
from twist_core.knn_join import JOIN_NPROBE, self_neighbours
from twist_core.label.review import (
    ReviewScores,
    ReviewSettings,
    Stats,
    cluster_stats,
    combine,
    doubts,
    score_index,
    tally,
)
from twist_core.layout import META_FILE
from twist_core.vectors import drop_self, normalized, search_params

VERSION = 2  # of the ``review`` table; an index whose table has another version is treated as having none
AFFECT_K = 50  # neighbours of a new or removed image examined for old images whose lists it enters or leaves
MEAN_TOLERANCE = 0.005
FULL_READ = 20_000  # ids past which their k-th similarities are read in one pass over the review table
INFO_KEY = "review"
DEFAULT_SETTINGS = ReviewSettings()  # the measured weights
TABLE_SQL = """
CREATE TABLE IF NOT EXISTS review (id INTEGER PRIMARY KEY, score REAL NOT NULL, suggestion INTEGER, kth REAL,
                                   neighbours BLOB);
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


def packed(neighbours: np.ndarray, sims: np.ndarray) -> list[bytes]:
    """Each row's neighbour ids (int64) then similarities (float32), as one blob."""
    return [n.tobytes() + m.tobytes() for n, m in zip(neighbours.astype(np.int64), sims.astype(np.float32),
                                                       strict=True)]


def unpacked(blob: bytes) -> tuple[np.ndarray, np.ndarray]:
    """A row's neighbour ids and similarities; the list's length is the blob's (12 bytes a neighbour)."""
    k = len(blob) // 12
    return np.frombuffer(blob[:8 * k], np.int64), np.frombuffer(blob[8 * k:], np.float32)


def insert_scores(meta: IndexMetadata, scores: ReviewScores) -> None:
    """Insert (or replace) rows of the ``review`` table, 100k at a time."""
    for start in range(0, len(scores.ids), 100_000):
        part = slice(start, start + 100_000)
        kth = scores.sims[part, -1] if scores.sims.shape[1] else np.full(len(scores.ids[part]), -np.inf)
        meta.executemany("INSERT OR REPLACE INTO review (id, score, suggestion, kth, neighbours) "
                         "VALUES (?, ?, ?, ?, ?)",
                         zip(scores.ids[part].tolist(), scores.score[part].astype(float).tolist(),
                             [None if s < 0 else s for s in scores.suggestion[part].tolist()],
                             kth.astype(float).tolist(), packed(scores.neighbours[part], scores.sims[part]),
                             strict=True))


def write_table(meta: IndexMetadata, scores: ReviewScores, settings: ReviewSettings, stats: Stats) -> None:
    """Replace the ``review`` table of a writable (unpublished) metadata copy; ``stats`` as the scores used."""
    meta.executescript("DROP TABLE IF EXISTS review;" + TABLE_SQL)
    insert_scores(meta, scores)
    set_settings(meta, settings, stats)


def set_settings(meta: IndexMetadata, settings: ReviewSettings, stats: Stats) -> None:
    meta.set_info({INFO_KEY: {"version": VERSION, "k": settings.k, "weighting": settings.weighting,
                              "neighbour_weight": settings.neighbour_weight,
                              "cluster_share": settings.cluster_share,
                              "cluster_doubt": {str(c): v for c, v in stats.items()}}})


def score_scan(index: faiss.Index, scan: TableScan, stages: Stages | None = None,
               settings: ReviewSettings = DEFAULT_SETTINGS) -> tuple[ReviewScores, Stats]:
    """The scores of a fresh build's labelled images (ids sorted) and the cluster means they used."""
    order = np.argsort(scan.ids, kind="stable")
    labelled = order[scan.clusters[order] >= 0]
    ids, clusters, margins = scan.ids[labelled], scan.clusters[labelled], scan.margins[labelled]
    progress = (lambda blocks: stages.counted(blocks, len(ids), lambda block: len(block[0]))) if stages else None
    scores = score_index(index, ids, clusters, margins, settings, progress)
    return scores, cluster_stats(margins, clusters)


# ---- an update: what changed, scored again
@dataclass
class Changes:
    """What an update's searches found: neighbours of the removed images (searched before they left) that must
    be searched again, and the ``AFFECT_K`` nearest of each new image (searched after it was added)."""

    lost: set[int]
    new_ids: np.ndarray
    found: np.ndarray
    found_sims: np.ndarray


def kth_of(meta: IndexMetadata, ids: np.ndarray) -> np.ndarray:
    """The stored k-th neighbour similarity of each of ``ids`` (any shape; NaN: none). Many ids are read in one
    pass over the table (one query instead of hundreds of ``IN`` lists)."""
    wanted = np.unique(ids[ids >= 0])
    sql = "SELECT id, kth FROM review WHERE kth IS NOT NULL"
    found = meta.query(sql + " ORDER BY id") if len(wanted) > FULL_READ else \
        sorted(chunked_in(meta.query, sql + " AND id IN ({marks})", wanted.tolist()))
    if not found:
        return np.full(np.shape(ids), np.nan)
    known = np.array([row[0] for row in found], np.int64)
    values = np.array([row[1] for row in found], np.float64)
    at = np.searchsorted(known, ids).clip(0, len(known) - 1)
    return np.where(known[at] == ids, values[at], np.nan)


def entered(found: np.ndarray, sims: np.ndarray, kth: np.ndarray) -> np.ndarray:
    """Where a search result sits in the image's own k nearest: similarity at least its stored k-th."""
    return (found >= 0) & np.isfinite(kth) & (sims >= kth - 1e-6)


def _search(index: faiss.Index, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ``AFFECT_K`` nearest of each vector, probing as many lists as the build's join did."""
    params = search_params(index, None, min(JOIN_NPROBE, int(getattr(faiss.try_extract_index_ivf(index), "nprobe", 1))))
    return index.search(normalized(vectors), min(AFFECT_K, index.ntotal), params=params)


def near_removed(index: faiss.Index, dropped: np.ndarray, meta: IndexMetadata) -> set[int]:
    """Images whose neighbour list holds one of ``dropped`` (sim >= their kth): they are searched again."""
    if not len(dropped):
        return set()
    sims, found = _search(index, index.reconstruct_batch(dropped))
    hit = entered(found, sims, kth_of(meta, found)) & ~np.isin(found, dropped)
    return set(found[hit].tolist())


def search_new(index: faiss.Index, vectors: np.ndarray, new_ids: np.ndarray, lost: set[int]) -> Changes:
    """The nearest stored images of each new vector (the index already holds them)."""
    if not len(vectors):
        return Changes(lost, new_ids, np.zeros((0, 0), np.int64), np.zeros((0, 0), np.float32))
    sims, found = _search(index, vectors)
    return Changes(lost, new_ids, found, sims)


def stored_settings(meta: IndexMetadata) -> tuple[ReviewSettings, Stats]:
    info = meta.info().get(INFO_KEY, {})
    settings = ReviewSettings(info.get("k", DEFAULT_SETTINGS.k), info.get("weighting", DEFAULT_SETTINGS.weighting),
                              info.get("neighbour_weight", DEFAULT_SETTINGS.neighbour_weight),
                              info.get("cluster_share", DEFAULT_SETTINGS.cluster_share))
    return settings, {int(c): list(v) for c, v in info.get("cluster_doubt", {}).items()}


def _move_means(meta: IndexMetadata, settings: ReviewSettings, stats: Stats, added: list[dict[str, Any]],
                removed: list[dict[str, Any]]) -> None:
    """Move each cluster's sum and count by the images added and removed; where its mean drifted past the
    tolerance, shift every score of the cluster (SQL) and record the new mean."""
    weight = (1.0 - settings.neighbour_weight) * settings.cluster_share
    for rows, sign in ((added, 1.0), (removed, -1.0)):
        for row in rows:
            if row[IMAGES.cluster] is not None:
                entry = stats.setdefault(int(row[IMAGES.cluster]), [np.nan, 0.0, 0.0])
                entry[1] += sign * float(doubts(np.array([np.nan if row[IMAGES.margin] is None
                                                          else row[IMAGES.margin]]))[0])
                entry[2] += sign
    for cluster, (mean, total, count) in stats.items():
        now = total / count if count > 0 else mean
        if np.isfinite(mean) and abs(now - mean) > MEAN_TOLERANCE:
            meta.query(f"UPDATE review SET score = score + ? WHERE id IN (SELECT {IMAGES.id} FROM {IMAGES.name} "
                       f"WHERE {IMAGES.cluster} = ?)", (weight * (now - mean), cluster))
        if not np.isfinite(mean) or abs(now - mean) > MEAN_TOLERANCE:
            stats[cluster][0] = now


def _merged_lists(meta: IndexMetadata, changes: Changes, k: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Neighbour lists after the update: a new image's from its search; an old image a new one entered, its
    stored list with the newcomers merged in (no search); ``lost`` images are left to a search."""
    lists: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    if not len(changes.new_ids):
        return lists
    own, own_sims = drop_self(changes.new_ids, changes.found[:, :k + 1], changes.found_sims[:, :k + 1], k)
    lists.update({int(i): (n, m) for i, n, m in zip(changes.new_ids, own, own_sims, strict=True)})
    found, sims = changes.found, changes.found_sims
    hit = entered(found, sims, kth_of(meta, found)) & ~np.isin(found, changes.new_ids)
    hit &= ~np.isin(found, np.fromiter(changes.lost, np.int64, len(changes.lost)))
    newcomers = np.broadcast_to(changes.new_ids[:, None], found.shape)[hit]
    entering: dict[int, list[tuple[int, float]]] = {}
    for x, y, sim in zip(found[hit].tolist(), newcomers.tolist(), sims[hit].tolist(), strict=True):
        entering.setdefault(x, []).append((y, sim))
    stored = dict(chunked_in(meta.query, "SELECT id, neighbours FROM review WHERE id IN ({marks})", list(entering)))
    for x, joining in entering.items():
        ids, near = unpacked(stored[x]) if stored.get(x) is not None else (np.zeros(0, np.int64), np.zeros(0))
        ids = np.concatenate([ids, [y for y, _ in joining]])
        near = np.concatenate([near, [sim for _, sim in joining]]).astype(np.float32)
        best = np.argsort(-near, kind="stable")[:k]
        lists[x] = ids[best], near[best]
    return lists


def _score_all(meta: IndexMetadata, index: faiss.Index, settings: ReviewSettings) -> int:
    """Score every image of a writable metadata copy again (an index of a few images: cheap)."""
    ids, clusters, margins = read_inputs(meta)
    write_table(meta, score_index(index, ids, clusters, margins, settings), settings, cluster_stats(margins, clusters))
    return len(ids)


def rescore(meta: IndexMetadata, index: faiss.Index, changes: Changes, removed: dict[int, dict[str, Any]]) -> int:
    """Bring the review table of a writable metadata copy (images already updated) up to date after an update:
    drop the ``removed`` rows, move cluster means that drifted, score the new images and the old ones whose
    neighbour list changed. Returns how many were scored."""
    settings, stats = stored_settings(meta)
    chunked_in(meta.query, "DELETE FROM review WHERE id IN ({marks})", list(removed))
    _move_means(meta, settings, stats, list(meta.rows(changes.new_ids.tolist()).values()), list(removed.values()))
    means = {c: v[0] for c, v in stats.items()}
    k = min(settings.k, index.ntotal - 1)
    if min(settings.k, index.ntotal - len(changes.new_ids) + len(removed) - 1) != k:
        return _score_all(meta, index, settings)  # a small index passed k: its stored lists have another length
    lists = _merged_lists(meta, changes, k) if k >= 1 else {}
    lost = np.array(sorted(changes.lost - set(lists)), np.int64)
    for batch, found, sims in (self_neighbours(index, lost, k) if len(lost) and k >= 1 else ()):
        lists.update({int(i): (n, m) for i, n, m in zip(batch, found, sims, strict=True)})
    rows = meta.rows(sorted(lists))
    ids = np.array([i for i, row in sorted(rows.items()) if row[IMAGES.cluster] is not None], np.int64)
    if len(ids):
        neighbours = np.array([lists[int(i)][0] for i in ids], np.int64).reshape(len(ids), k)
        sims = np.array([lists[int(i)][1] for i in ids], np.float32).reshape(len(ids), k)
        known = np.unique(neighbours[neighbours >= 0])
        cluster_of = dict(chunked_in(meta.query, f"SELECT {IMAGES.id}, {IMAGES.cluster} FROM {IMAGES.name} "
                                     f"WHERE {IMAGES.id} IN ({{marks}})", known.tolist()))
        all_ids = np.union1d(known, ids)
        clusters = np.array([-1 if cluster_of.get(int(i)) is None else cluster_of[int(i)] for i in all_ids])
        own = np.array([rows[int(i)][IMAGES.cluster] for i in ids], np.int64)
        margins = np.array([np.nan if rows[int(i)][IMAGES.margin] is None else rows[int(i)][IMAGES.margin]
                            for i in ids], np.float32)
        agreement, suggestion = tally(all_ids, clusters.astype(np.int64), own, neighbours, sims, settings.weighting)
        insert_scores(meta, ReviewScores(ids, combine(agreement, margins, own, settings, means), suggestion,
                                         neighbours, sims))
    set_settings(meta, settings, stats)
    return len(ids)


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
        cpu_index = read_index(folder)
        nprobe = meta.info().get("nprobe")
        if nprobe and hasattr(cpu_index, "nprobe"):
            cpu_index.nprobe = int(nprobe)
        scores = score_index(cpu_index, ids, clusters, margins, settings)

        def write_meta(path: Path, generation: int) -> None:
            copy = meta.copy_to(path)
            write_table(copy, scores, settings, cluster_stats(margins, clusters))
            copy.set_info({"generation": generation})
            copy.commit()
            copy.close()

        commit_generation(index_dir, cpu_index, write_meta, expected=manifest["generation"],
                          step=Step.encode(cpu_index))  # the vectors are unchanged: the FAISS files are linked
    finally:
        meta.close()
    return len(ids)


def meta_has_scores(meta: IndexMetadata) -> bool:
    """Whether an open metadata database holds a review table of this version."""
    return meta.info().get(INFO_KEY, {}).get("version") == VERSION


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
