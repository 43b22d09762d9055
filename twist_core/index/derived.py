"""Per-generation derived tables: what the app's first screens need, computed once when a generation is written.

A generation's metadata never changes once published, so per predicted cluster its size and confidence sum, a
fixed-size random sample of ids (the map, the merge suggestions), the number of scored images (the review
queue) and the page-order checkpoints (a jump to a page by number) are written beside the images by
:func:`write_derived`, which ``commit_generation`` calls on every new
generation. A request then reads a few dozen rows instead of grouping all N images. The curated figures are
these adjusted by the curation store's overrides and merges (:mod:`twist_core.curate.curation`), whose cost
follows the number of overrides.

An index written before these tables existed still opens: :func:`read_derived` computes the same figures in
memory once (one pass over the images) and says so in the log.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from twist_core.index.metadata import IMAGES, chunked_in
from twist_core.layout import INFO_TABLE

log = logging.getLogger("twist.index")

VERSION = 2  # of the derived tables; another version is computed in memory at open, as if absent
SAMPLE_SIZE = 20_000  # ids in the sample, in random order: any prefix is itself a random sample
SAMPLE_SEED = 0
QUANTILES = 1000  # of the review scores: a shown share ("higher than 97 % of the images") without counting them
CHECKPOINT = 1000  # images between two checkpoints: a jump by page number walks fewer than this (plus overrides)
CLUSTERS_TABLE = "derived_clusters"
SAMPLE_TABLE = "derived_sample"
CHECKPOINTS_TABLE = "derived_checkpoints"
INFO_KEY = "derived"
REVIEW_INFO_KEY = "review"  # twist_core.index.review_table's info key: the review table is there when it is set

TABLES_SQL = f"""
DROP TABLE IF EXISTS {CLUSTERS_TABLE};
DROP TABLE IF EXISTS {SAMPLE_TABLE};
DROP TABLE IF EXISTS {CHECKPOINTS_TABLE};
CREATE TABLE {CLUSTERS_TABLE} (cluster INTEGER PRIMARY KEY, size INTEGER NOT NULL, conf_sum REAL NOT NULL,
                               conf_n INTEGER NOT NULL);
CREATE TABLE {SAMPLE_TABLE} (rank INTEGER PRIMARY KEY, id INTEGER NOT NULL);
CREATE TABLE {CHECKPOINTS_TABLE} (cluster INTEGER NOT NULL, descending INTEGER NOT NULL, rank INTEGER NOT NULL,
                                  confidence REAL, id INTEGER NOT NULL, PRIMARY KEY (cluster, descending, rank));
"""


@dataclass(frozen=True)
class ClusterStats:
    """One predicted cluster: its images, and the sum and number of their known confidences (mean = sum / n)."""

    size: int
    conf_sum: float
    conf_n: int


@dataclass(frozen=True)
class Derived:
    """The derived figures of one generation, held in memory by whoever serves it (a few kB)."""

    clusters: dict[int, ClusterStats] = field(default_factory=dict)
    sample: tuple[int, ...] = ()  # ids in random order
    review_rows: int | None = None  # scored images still in the index; None without a review table
    review_quantiles: tuple[float, ...] = ()  # their scores at shares 0, 1/QUANTILES, ..., 1 (ascending)
    checkpoints: int = 0  # images between two of CHECKPOINTS_TABLE's checkpoints; 0: none (jumps walk)

    def share_at_least(self, score: float) -> float | None:
        """The share of the scored images whose score is ``score`` or more, read off the quantiles (to about
        1/QUANTILES; never below one image); None without them."""
        if not self.review_quantiles or not self.review_rows:
            return None
        quantiles = np.asarray(self.review_quantiles)
        first = int(np.searchsorted(quantiles, score, "left"))
        if first < len(quantiles) and quantiles[first] == score:  # a tie: every image at that score counts
            below = first / (len(quantiles) - 1)
        else:
            below = float(np.interp(score, quantiles, np.linspace(0.0, 1.0, len(quantiles)), left=0.0, right=1.0))
        return max(1.0 / self.review_rows, 1.0 - below)


def compute(db: sqlite3.Connection, schema: str = "main") -> Derived:
    """The figures from the images themselves: one grouped pass over the cluster index, and lookups by id.

    Nothing here reads every image into Python (1M rows took 2.5 CPU-s, the largest cost of a 1 % update): the
    sample is drawn among the id range and kept where an image has that id, and the score quantiles are those
    of the sample's images (exact while the index holds no more than ``SAMPLE_SIZE`` images, within about
    half a percent of the share beyond that).
    """
    clusters = {int(c): ClusterStats(int(n), float(s or 0.0), int(k)) for c, n, s, k in db.execute(
        f"SELECT {IMAGES.cluster}, COUNT(*), TOTAL({IMAGES.confidence}), COUNT({IMAGES.confidence}) "
        f"FROM {schema}.{IMAGES.name} WHERE {IMAGES.cluster} IS NOT NULL GROUP BY {IMAGES.cluster}")}
    sample = draw_sample(db, schema)
    review, quantiles = None, ()
    if _has_table(db, schema, "review") and _info(db, schema, REVIEW_INFO_KEY) is not None:
        review = int(db.execute(f"SELECT COUNT(*) FROM {schema}.review").fetchone()[0])
        scores = np.array([r[0] for r in chunked_in(
            lambda sql, params: db.execute(sql, params).fetchall(),
            f"SELECT score FROM {schema}.review WHERE id IN ({{marks}})", sample.tolist())], np.float64)
        if review and len(scores):
            quantiles = tuple(float(q) for q in np.quantile(scores, np.linspace(0.0, 1.0, QUANTILES + 1)))
    return Derived(clusters, tuple(int(i) for i in sample), review, quantiles)


def draw_sample(db: sqlite3.Connection, schema: str = "main") -> np.ndarray:
    """``SAMPLE_SIZE`` ids (all of them when there are fewer) in random order, the same for the same images.

    Ids are drawn uniformly from the id range and kept where an image holds them, so the cost follows the sample,
    not N; rounds go on until enough are found (ids freed by removals only make a round find fewer).
    """
    count, low, high = db.execute(f"SELECT COUNT(*), MIN({IMAGES.id}), MAX({IMAGES.id}) "
                                  f"FROM {schema}.{IMAGES.name}").fetchone()
    if not count:
        return np.zeros(0, np.int64)
    wanted = min(SAMPLE_SIZE, int(count))
    rng = np.random.default_rng(SAMPLE_SEED)
    span = int(high) - int(low) + 1
    if count <= 4 * wanted or span <= 4 * wanted:  # few or dense: every id once, shuffled, then kept in that order
        ids = np.array([r[0] for r in db.execute(f"SELECT {IMAGES.id} FROM {schema}.{IMAGES.name} "
                                                f"ORDER BY {IMAGES.id}")], np.int64)
        return rng.permutation(ids)[:wanted]
    found: list[int] = []
    seen: set[int] = set()
    while len(found) < wanted:
        draw = [int(i) for i in rng.integers(low, high + 1, 2 * (wanted - len(found))) if int(i) not in seen]
        draw = list(dict.fromkeys(draw))
        seen.update(draw)
        present = {r[0] for r in chunked_in(lambda sql, params: db.execute(sql, params).fetchall(),
                                            f"SELECT {IMAGES.id} FROM {schema}.{IMAGES.name} "
                                            f"WHERE {IMAGES.id} IN ({{marks}})", draw)}
        found += [i for i in draw if i in present][:wanted - len(found)]
    return np.array(found, np.int64)


def write_derived(db: sqlite3.Connection, checkpoint: int = CHECKPOINT) -> None:
    """Write the derived tables of a new (unpublished) generation's metadata, replacing any copied from the last
    (``checkpoint``: images between two checkpoints; tests make it small)."""
    derived = compute(db)
    db.executescript(TABLES_SQL)
    db.executemany(f"INSERT INTO {CHECKPOINTS_TABLE} (cluster, descending, rank, confidence, id) "
                   "VALUES (?, ?, ?, ?, ?)", checkpoints(db, derived.clusters, int(checkpoint)))
    db.executemany(f"INSERT INTO {CLUSTERS_TABLE} (cluster, size, conf_sum, conf_n) VALUES (?, ?, ?, ?)",
                   [(c, s.size, s.conf_sum, s.conf_n) for c, s in derived.clusters.items()])
    db.executemany(f"INSERT INTO {SAMPLE_TABLE} (rank, id) VALUES (?, ?)", enumerate(derived.sample))
    db.execute(f"INSERT OR REPLACE INTO {INFO_TABLE} (key, value) VALUES (?, ?)",
               (INFO_KEY, json.dumps({"version": VERSION, "review_rows": derived.review_rows,
                                      "review_quantiles": derived.review_quantiles,
                                      "checkpoint": int(checkpoint)})))
    db.commit()


def checkpoints(db: sqlite3.Connection, clusters: Iterable[int], spacing: int) -> list[tuple]:
    """(cluster, descending, rank, confidence, id) of every ``spacing``-th image of each cluster in each page
    order, ranked (from 1) among the images a page without a confidence filter reads: known confidences in
    [0, 1] by confidence then id, the unknown ones by id, last when descending and first when ascending.

    Each step skips ``spacing`` entries of a (cluster, confidence) index from the last checkpoint (OFFSET over
    an index counts without reading rows): 0.28 CPU-s at 1M images, where a ROW_NUMBER() window took 1.1 s.
    """
    found = []
    for cluster in clusters:
        for descending in (1, 0):
            rows, carried = [], 0
            for known in ((True, False) if descending else (False, True)):
                more, carried = _every(db, cluster, bool(descending), known, spacing, carried)
                rows += more
            found += [(cluster, descending, (k + 1) * spacing, conf, image_id)
                      for k, (conf, image_id) in enumerate(rows)]
    return found


def _every(db: sqlite3.Connection, cluster: int, descending: bool, known: bool, spacing: int, carried: int
           ) -> tuple[list[tuple], int]:
    """The checkpoints in one part of a cluster's page order (its known or its unknown confidences), the first
    ``spacing - carried`` images in; and how many images of the part follow its last checkpoint (plus
    ``carried`` when it has none), which the next part carries."""
    conf, ident = IMAGES.confidence, IMAGES.id
    order = f"{conf} {'DESC' if descending else 'ASC'}, {ident}" if known else ident
    cursor: tuple | None = None
    found: list[tuple] = []
    need = spacing - carried
    while True:
        if known:
            low, high = (0.0, 1.0) if cursor is None else (0.0, cursor[0]) if descending else (cursor[0], 1.0)
            where, params = f"{conf} BETWEEN ? AND ?", [low, high]
            if cursor is not None:
                where, params = f"{where} AND ({conf} != ? OR {ident} > ?)", [*params, *cursor]
        else:
            where, params = f"{conf} IS NULL", []
            if cursor is not None:
                where, params = f"{where} AND {ident} > ?", [cursor[1]]
        part = f"FROM {IMAGES.name} WHERE {IMAGES.cluster} = ? AND {where} ORDER BY {order}"
        row = db.execute(f"SELECT {conf}, {ident} {part} LIMIT 1 OFFSET ?", [cluster, *params, need - 1]).fetchone()
        if row is None:
            left = db.execute(f"SELECT COUNT(*) FROM (SELECT 1 {part} LIMIT ?)", [cluster, *params, need]).fetchone()
            return found, spacing - need + left[0]
        found.append(row)
        cursor, need = row, spacing


def read_derived(db: sqlite3.Connection, schema: str = "main") -> Derived:
    """The derived figures of an open generation: read from its tables, or computed once for an older index."""
    info = _info(db, schema, INFO_KEY)
    if not info or info.get("version") != VERSION:
        log.warning("the index's metadata has no derived tables (an older twist wrote it): counting its images "
                    "once now; twist index --update writes them")
        return compute(db, schema)
    clusters = {int(c): ClusterStats(int(n), float(s), int(k)) for c, n, s, k in db.execute(
        f"SELECT cluster, size, conf_sum, conf_n FROM {schema}.{CLUSTERS_TABLE}")}
    sample = tuple(r[0] for r in db.execute(f"SELECT id FROM {schema}.{SAMPLE_TABLE} ORDER BY rank"))
    return Derived(clusters, sample, info.get("review_rows"), tuple(info.get("review_quantiles") or ()),
                   int(info["checkpoint"]))


def _has_table(db: sqlite3.Connection, schema: str, name: str) -> bool:
    return db.execute(f"SELECT 1 FROM {schema}.sqlite_master WHERE type = 'table' AND name = ?",
                      (name,)).fetchone() is not None


def _info(db: sqlite3.Connection, schema: str, key: str) -> dict | None:
    found = db.execute(f"SELECT value FROM {schema}.{INFO_TABLE} WHERE key = ?", (key,)).fetchall()
    return json.loads(found[0][0]) if found else None
