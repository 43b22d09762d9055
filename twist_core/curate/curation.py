"""The curation store: cluster names, merges, per-image moves and exclusions, with an undo log.

It lives in one SQLite file beside the index (``curation.sqlite``) so a restart or a second browser tab
sees the same state. The index's own metadata is attached read-only. A cluster's page is read by keyset over
the (cluster, confidence) indexes, one ordered query per predicted cluster feeding it plus one over the images
moved in, merged; sizes are the generation's kept per-cluster figures (:mod:`twist_core.index.derived`)
adjusted by the merges and overrides. No request reads every image, whatever N.

Effective label of an image = its override (a move, or ``EXCLUDED``), else the cluster its predicted
cluster was merged into, else its predicted cluster. Merges never chain: a merge re-points whatever was
merged into its sources, and a target that was itself merged away resolves to where it went.

Every change reads what it overwrites inside the same ``BEGIN IMMEDIATE`` transaction as its write, so
concurrent users (threads of one app, or several app processes) always log the true previous state and
undo restores exactly the state before the action it undoes. Moves are keyed by index ids, which stay with
their files across rebuilds; the store remembers the index's uid and refuses to open for another index.
A running app follows index updates by re-attaching the new generation's metadata (:meth:`reattach`).

The store also remembers the fingerprint of the model whose clusters its names, merges, moves and
confirmations refer to. When the index is relabelled by another model (``twist finetune``, ``twist export``,
``twist index --update``), cluster numbers mean other clusters: that curation is written to a file beside the
store and no longer applied, and :attr:`CurationStore.notice` says so. Exclusions concern images, not
clusters, and stay. ``twist finetune`` records in the store which runs learned from it, and the file says so.
A store written before stores recorded their model takes the model the index held when its last change
was made (the index keeps a history of its models with the time each came in).
"""

from __future__ import annotations

import bisect
import contextlib
import heapq
import itertools
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twist_core.curate.set_aside import SET_ASIDE_FILE, UNDO_TABLES, SetAside, describe_held
from twist_core.curate.store_file import ACTION_TIME_FORMAT, CurationError, curation_path, store_model
from twist_core.index.derived import CHECKPOINTS_TABLE, Derived, read_derived
from twist_core.index.metadata import IMAGES, chunked_in, meta_path
from twist_core.io_utils import atomic_write_text, mark_output_folder
from twist_core.layout import INFO_TABLE

EXCLUDED = -1  # the label of an image taken out of the dataset
HELD = ("name(s)", "merge(s)", "move(s)", "exclusion(s)", "confirmation(s)", "undo step(s)")  # see held()

SCHEMA = """
CREATE TABLE IF NOT EXISTS names (cluster INTEGER PRIMARY KEY, name TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS merges (cluster INTEGER PRIMARY KEY, into_cluster INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS overrides (image_id INTEGER PRIMARY KEY, cluster INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS overrides_cluster ON overrides (cluster);
CREATE TABLE IF NOT EXISTS undo_log (seq INTEGER PRIMARY KEY AUTOINCREMENT, action TEXT NOT NULL,
                                     at TEXT NOT NULL, previous TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS binding (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS confirmed (image_id INTEGER PRIMARY KEY, cluster INTEGER NOT NULL);
"""

# The effective label as an SQL expression over the index's images i (attached as idx), overrides o, merges m.
LABEL_SQL = f"COALESCE(o.cluster, m.into_cluster, i.{IMAGES.cluster})"
JOINS = (f"FROM idx.{IMAGES.name} i LEFT JOIN overrides o ON o.image_id = i.{IMAGES.id} "
         f"LEFT JOIN merges m ON m.cluster = i.{IMAGES.cluster} LEFT JOIN confirmed c ON c.image_id = i.{IMAGES.id}")
# One image as a Record: its effective label, whether it was moved, whether it was confirmed.
RECORD_COLUMNS = (f"SELECT i.{IMAGES.id}, i.{IMAGES.path}, i.{IMAGES.cluster}, i.{IMAGES.confidence}, "
                  f"i.{IMAGES.topk}, {LABEL_SQL}, o.cluster, c.image_id")
RECORD_SQL = f"{RECORD_COLUMNS} {JOINS}"
# The images moved into a cluster, found from the overrides (their number, never N, sets the cost).
# CROSS JOIN: the overrides drive the loop (the planner, knowing no sizes, would rather scan every image).
OVERRIDDEN = f"FROM overrides o CROSS JOIN idx.{IMAGES.name} i ON i.{IMAGES.id} = o.image_id"
MOVED_SQL = (f"{RECORD_COLUMNS} {OVERRIDDEN} "
             f"LEFT JOIN merges m ON m.cluster = i.{IMAGES.cluster} LEFT JOIN confirmed c ON c.image_id = o.image_id")
# Only the (confidence, id) of the same images: passing many of them (a jump to a page by number) stays light.
KEYS_SQL = (f"SELECT i.{IMAGES.confidence}, i.{IMAGES.id} FROM idx.{IMAGES.name} i "
            f"LEFT JOIN overrides o ON o.image_id = i.{IMAGES.id}")
KEYS_MOVED_SQL = f"SELECT i.{IMAGES.confidence}, i.{IMAGES.id} {OVERRIDDEN}"
Cursor = tuple[float | None, int]  # (confidence, id) of the last image of a page: the next page starts after it


@dataclass(frozen=True)
class Record:
    """One image with its predicted and effective label."""

    id: int
    path: str
    predicted: int | None
    confidence: float | None
    topk: str | None
    label: int | None
    status: str  # predicted, merged, confirmed, moved or excluded


def order_key(descending: bool, id_descending: bool = False) -> Callable[[float | None, int], tuple]:
    """The sort key of a cluster's pages: by confidence (an unknown one as the lowest), then by id."""
    def key(confidence: float | None, image_id: int) -> tuple:
        unknown = confidence is None
        value = 0.0 if unknown else float(confidence)
        return (unknown, -value, -image_id if id_descending else image_id) if descending else \
            (not unknown, value, -image_id if id_descending else image_id)

    return key


def cursor_of(record: Record) -> Cursor:
    """Where the page after ``record`` starts."""
    return record.confidence, record.id


def _record(row: tuple) -> Record:
    """A row of RECORD_SQL as a Record: a person's latest say wins (exclusion, move, confirmation, merge)."""
    image_id, path, predicted, confidence, topk, label, moved, confirmed = row
    status = ("excluded" if label == EXCLUDED else "moved" if moved is not None
              else "confirmed" if confirmed is not None else "merged" if label != predicted else "predicted")
    return Record(image_id, path, predicted, confidence, topk, label, status)


class CurationStore:
    """Read and change the curated labels of one index; every change is one transaction plus an undo entry."""

    @classmethod
    def for_index(cls, index_dir: str | Path, state_dir: str | Path | None = None,
                  default_names: Sequence[str] = (), metadata: Path | None = None) -> CurationStore:
        """The store of the index in ``index_dir``: its file in the state folder (the index folder unless
        given), over the metadata of the index's current generation unless ``metadata`` names the one served."""
        return cls(curation_path(index_dir, state_dir), metadata or meta_path(Path(index_dir)), default_names)

    def __init__(self, path: Path, meta_path: Path, default_names: Sequence[str]) -> None:
        self.path = Path(path)
        mark_output_folder(self.path.parent)  # the app's state folder: folder scans skip it
        self.default_names = list(default_names)
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.RLock()  # one connection shared by the server's worker threads
        try:
            self._attach(meta_path)
        except BaseException:
            self._db.close()  # a refused store is left as it was: no journal files, nothing written
            raise

    def _attach(self, meta_path: Path) -> None:
        uri = f"file:{Path(meta_path).resolve()}?mode=ro"
        self._db.execute("ATTACH DATABASE ? AS idx", (uri,))
        self.derived: Derived = read_derived(self._db, "idx")
        self._bind_to_index()

    def reattach(self, meta_path: Path) -> None:
        """Read the images of a newer generation of the same index (``twist index --update``, app running).

        Ids are stable across updates, so every name, merge and move applies to the new generation as it did.
        """
        with self._lock:
            previous = self._query("SELECT file FROM pragma_database_list WHERE name = 'idx'")[0][0]
            self._db.execute("DETACH DATABASE idx")
            try:
                self._attach(meta_path)
            except (sqlite3.Error, CurationError):
                with contextlib.suppress(sqlite3.Error):  # back to the generation it read before, if still there
                    self._db.execute("ATTACH DATABASE ? AS idx", (f"file:{previous}?mode=ro",))
                    self.derived = read_derived(self._db, "idx")
                raise

    def _index_value(self, key: str) -> Any:
        found = self._query(f"SELECT value FROM idx.{INFO_TABLE} WHERE key = ?", (key,))
        return json.loads(found[0][0]) if found else None

    def _binding(self, key: str) -> str | None:
        found = self._query("SELECT value FROM binding WHERE key = ?", (key,))
        return found[0][0] if found else None

    def _bind(self, key: str, value: str) -> None:
        """Write a binding when it changes (opening a store with its own index leaves its file as it was)."""
        if self._binding(key) != value:
            self._db.execute("INSERT OR REPLACE INTO binding (key, value) VALUES (?, ?)", (key, value))

    def held(self) -> dict[str, int]:
        """How many rows of each kind the store holds that name images or clusters (moves are by image id)."""
        counts = self._query(
            f"SELECT (SELECT COUNT(*) FROM names), (SELECT COUNT(*) FROM merges), "
            f"(SELECT COUNT(*) FROM overrides WHERE cluster != {EXCLUDED}), "
            f"(SELECT COUNT(*) FROM overrides WHERE cluster = {EXCLUDED}), "
            "(SELECT COUNT(*) FROM confirmed), (SELECT COUNT(*) FROM undo_log)")[0]
        return dict(zip(HELD, counts, strict=True))

    def _bind_to_index(self) -> None:
        """Remember which index the ids belong to and which model the clusters are of.

        A store holding anything keyed by image or cluster is refused by an index of another lineage (its
        uid: a new build, not an update of the same folder); curation made for another model's clusters of
        the same index is set aside (:meth:`_set_aside`).
        """
        uid, model = self._index_value("uid"), self._index_value("model_sha256")
        here = self._index_folder()
        with self._transaction():
            if uid is not None:  # None: an index written before uids existed
                bound = self._binding("index_uid")
                if bound and bound != uid:
                    self._refuse_other_index(bound, uid, here)
                self._bind("index_uid", uid)
                self._bind("index_path", here)
            if model is not None:  # None: an index written before model fingerprints were recorded
                index_info = {"model_sha256": model, "model_history": self._index_value("model_history")}
                bound_model = store_model(self._db, index_info)  # an older store's: the model of its last change
                if bound_model and bound_model != model:
                    self._set_aside(bound_model, model)
                self._bind("model_sha256", model)

    def _index_folder(self) -> str:
        """The folder of the index attached (its generation's metadata lies in a subfolder of it)."""
        attached = self._query("SELECT file FROM pragma_database_list WHERE name = 'idx'")[0][0]
        return str(Path(attached).parent.parent)

    def _refuse_other_index(self, bound: str, uid: str, here: str) -> None:
        """Raise unless the store is empty: its ids and clusters belong to the index it was made with."""
        held = describe_held(self.held())
        if not held:
            return
        there = self._binding("index_path")
        raise CurationError(
            f"{self.path} holds curation made for another index ({there + ', ' if there else ''}uid {bound[:12]}): "
            f"{held}; {here} (uid {uid[:12]}) is a different index, whose ids and clusters name other images: "
            "open the store with the index it was made for, or give a new --state-dir (nothing was changed)")

    def _set_aside(self, old: str, new: str) -> None:
        """Write what refers to the old model's clusters to a file and stop applying it (inside a transaction).

        Names, merges, moves into clusters, confirmations and the undo log go; exclusions stay.
        """
        learned = json.loads(self._binding("learned_by") or "[]")
        aside = self._write_aside(old, new)
        if aside is None:
            return
        target, kept = aside
        counts = ", ".join(f"{len(kept[key])} {word}" for key, word in (
            ("moves", "move(s)"), ("confirmed", "confirmation(s)"), ("merges", "merge(s)"), ("names", "name(s)")))
        runs = ", ".join(sorted({entry["run"] for entry in learned}))
        self._bind("notice", f"the model changed ({old[:12]} -> {new[:12]}): {counts} made for the old model's "
                             f"clusters are set aside in {target} and no longer applied, since the new model numbers "
                             f"its clusters anew (twist restore-state {target} --index INDEX brings them back once "
                             "the index holds that model again)"
                             + (f"; twist finetune learned from them ({runs})" if runs else "")
                             + "; exclusions still apply")

    def _write_aside(self, old: str, new: str) -> tuple[Path, dict[str, Any]] | None:
        """Move names, merges, moves, confirmations and the undo log to a new file beside the store (inside a
        transaction); None when there was none of them. Exclusions stay."""
        kept = {
            "names": dict(self._query("SELECT cluster, name FROM names")),
            "merges": dict(self._query("SELECT cluster, into_cluster FROM merges")),
            "moves": self._with_paths("overrides", f"WHERE t.cluster != {EXCLUDED}"),
            "confirmed": self._with_paths("confirmed", ""),
            "undo_log": [{"action": a, "at": t, "previous": json.loads(p)} for a, t, p in
                         self._query("SELECT action, at, previous FROM undo_log ORDER BY seq")],
        }
        if not any(kept[key] for key in ("names", "merges", "moves", "confirmed")):
            self._db.execute("DELETE FROM undo_log")
            return None
        learned = json.loads(self._binding("learned_by") or "[]")
        target = self._new_aside_path(old)
        atomic_write_text(target, json.dumps({"model_sha256": old, "new_model_sha256": new,
                                              "index_uid": self._binding("index_uid"),
                                              "set_aside_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                                              "learned_by": learned, **kept}, indent=2) + "\n")
        for sql in ("DELETE FROM names", "DELETE FROM merges", f"DELETE FROM overrides WHERE cluster != {EXCLUDED}",
                    "DELETE FROM confirmed", "DELETE FROM undo_log"):
            self._db.execute(sql)
        self._bind("learned_by", "[]")
        return target, kept

    def _new_aside_path(self, model: str) -> Path:
        """A set-aside file name not taken yet (two set asides in one second never overwrite each other)."""
        first = self.path.parent / SET_ASIDE_FILE.format(model=model[:12], time=time.strftime("%Y%m%d-%H%M%S"))
        candidates = (first.with_name(f"{first.stem}-{n}{first.suffix}") for n in range(2, 10_000))
        return next(p for p in (first, *candidates) if not p.exists())

    def restore(self, saved: SetAside) -> Path | None:
        """Apply a set-aside file's curation again, as it was; the curation held now is set aside first.

        Refused unless the index is the one (same lineage) and holds the model the curation was made for, so
        its ids and cluster numbers mean what they meant. Returns the file the current curation went to.
        """
        uid, model = self._index_value("uid"), self._index_value("model_sha256")
        if saved.index_uid and uid and saved.index_uid != uid:
            raise CurationError(f"that curation was made for another index (uid {saved.index_uid[:12]}), not "
                                f"{self._index_folder()} (uid {uid[:12]}); nothing was changed")
        if model != saved.model_sha256:
            raise CurationError(f"that curation was made for the clusters of model {saved.model_sha256[:12]}, but "
                                f"{self._index_folder()} now holds model {str(model)[:12]}: relabel the index with "
                                "that model first (twist index --update --out INDEX --model MODEL.onnx); nothing was "
                                "changed")
        self._check_restored_clusters(saved)
        with self._transaction():
            aside = self._write_aside(model, model)
            self._db.executemany("INSERT INTO names (cluster, name) VALUES (?, ?)", saved.names.items())
            self._db.executemany("INSERT INTO merges (cluster, into_cluster) VALUES (?, ?)", saved.merges.items())
            self._db.executemany("INSERT OR IGNORE INTO overrides (image_id, cluster) VALUES (?, ?)",  # exclusions
                                 saved.moves.items())  # made since stay: the later decision
            self._db.executemany("INSERT INTO confirmed (image_id, cluster) VALUES (?, ?)", saved.confirmed.items())
            self._db.executemany("INSERT INTO undo_log (action, at, previous) VALUES (?, ?, ?)",
                                 [(a, t, json.dumps(p)) for a, t, p in saved.undo_log])
            self._bind("learned_by", json.dumps(saved.learned_by))
            self._db.execute("DELETE FROM binding WHERE key = 'notice'")
        return aside[0] if aside else None

    def _check_restored_clusters(self, saved: SetAside) -> None:
        """Every cluster a set-aside file names must be one of the model's (when the store knows how many)."""
        if not self.n_clusters:
            return
        named = [*saved.names, *saved.merges, *saved.merges.values(), *saved.confirmed.values(),
                 *(c for c in saved.moves.values() if c != EXCLUDED)]
        wrong = sorted({c for c in named if not 0 <= c < self.n_clusters})
        if wrong:
            raise CurationError(f"that curation names cluster {wrong[0]}, which the model does not have (clusters are "
                                f"0 to {self.n_clusters - 1}); nothing was changed")

    def _with_paths(self, table: str, where: str) -> list[dict[str, Any]]:
        """Rows of an image-keyed table with each image's path (None when the image left the index)."""
        rows = self._query(f"SELECT t.image_id, i.{IMAGES.path}, t.cluster FROM {table} t "
                           f"LEFT JOIN idx.{IMAGES.name} i ON i.{IMAGES.id} = t.image_id {where} ORDER BY t.image_id")
        return [{"image_id": i, "path": path, "cluster": cluster} for i, path, cluster in rows]

    @property
    def notice(self) -> str | None:
        """What happened to curation made for an earlier model, if anything was set aside."""
        return self._binding("notice")

    def record_learning(self, run: str, images: int) -> None:
        """Note that ``twist finetune`` learned from this curation into ``run`` (said when it is set aside)."""
        with self._transaction():
            learned = json.loads(self._binding("learned_by") or "[]")
            learned.append({"run": run, "images": int(images), "at": time.strftime("%Y-%m-%d %H:%M:%S")})
            self._bind("learned_by", json.dumps(learned))

    def close(self) -> None:
        self._db.close()

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    # ---- reading
    @property
    def n_clusters(self) -> int:
        return len(self.default_names)

    def names(self) -> dict[int, str]:
        """Every cluster's current name (renamed, else the model's class name)."""
        names = dict(enumerate(self.default_names))
        names.update(dict(self._query("SELECT cluster, name FROM names")))
        return names

    def name(self, cluster: int | None) -> str:
        if cluster is None:
            return ""
        if cluster == EXCLUDED:
            return "excluded"
        return self.names().get(int(cluster), f"cluster {cluster}")

    def merged_into(self, cluster: int) -> int:
        found = self._query("SELECT into_cluster FROM merges WHERE cluster = ?", (int(cluster),))
        return found[0][0] if found else int(cluster)

    def summary(self) -> list[dict[str, Any]]:
        """Size and mean confidence per effective label (non-empty ones), excluded images as ``EXCLUDED``.

        The generation's per-cluster figures (:mod:`twist_core.index.derived`) moved by the merges, then by the
        overrides, grouped by (predicted, now): the cost follows the number of overrides, never N.
        """
        merged = self.merges()
        totals: dict[int, list[float]] = {}

        def add(label: int, n: int, conf_sum: float, conf_n: int, sign: int = 1) -> None:
            entry = totals.setdefault(label, [0, 0.0, 0])
            entry[0] += sign * n
            entry[1] += sign * conf_sum
            entry[2] += sign * conf_n

        for cluster, stats in self.derived.clusters.items():
            add(merged.get(cluster, cluster), stats.size, stats.conf_sum, stats.conf_n)
        for predicted, label, n, conf_sum, conf_n in self._query(
                f"SELECT i.{IMAGES.cluster}, o.cluster, COUNT(*), TOTAL(i.{IMAGES.confidence}), "
                f"COUNT(i.{IMAGES.confidence}) {OVERRIDDEN} GROUP BY i.{IMAGES.cluster}, o.cluster"):
            if predicted is not None:
                add(merged.get(predicted, predicted), n, conf_sum, conf_n, -1)
            add(label, n, conf_sum, conf_n)
        names = self.names()
        return [{"cluster": c, "name": "excluded" if c == EXCLUDED else names.get(c, f"cluster {c}"),
                 "size": int(n), "mean_confidence": total / known if known else None}
                for c, (n, total, known) in sorted(totals.items()) if n > 0]

    def _sources(self, label: int) -> list[int]:
        """The predicted clusters whose images (not overridden) have the effective label ``label``."""
        if label == EXCLUDED:
            return []
        merged_here = [r[0] for r in self._query("SELECT cluster FROM merges WHERE into_cluster = ?", (label,))]
        return merged_here if self.merged_into(label) != label else [label, *merged_here]

    def count(self, label: int, min_conf: float = 0.0, max_conf: float = 1.0) -> int:
        """Images with the effective label ``label`` whose confidence (unknown: 0) lies in the range.

        The whole range is the summary's figure; a narrower one counts index ranges of the predicted clusters,
        less the overridden, plus the moved in.
        """
        label, low, high = int(label), float(min_conf), float(max_conf)
        if low <= 0.0 and high >= 1.0:
            return next((c["size"] for c in self.summary() if c["cluster"] == label), 0)
        total = 0
        for source in self._sources(label):
            total += self._query(f"SELECT COUNT(*) FROM idx.{IMAGES.name} WHERE {IMAGES.cluster} = ? AND "
                                 f"{IMAGES.confidence} BETWEEN ? AND ?", (source, low, high))[0][0]
            if low <= 0.0 <= high:
                total += self._query(f"SELECT COUNT(*) FROM idx.{IMAGES.name} WHERE {IMAGES.cluster} = ? AND "
                                     f"{IMAGES.confidence} IS NULL", (source,))[0][0]
        in_range = f"COALESCE(i.{IMAGES.confidence}, 0) BETWEEN ? AND ?"
        sources = self._sources(label)
        if sources:
            total -= chunked_in(self._query, f"SELECT COUNT(*) {OVERRIDDEN} WHERE {in_range} AND "
                                f"i.{IMAGES.cluster} IN ({{marks}})", sources, (low, high))[0][0]
        return total + self._query(f"SELECT COUNT(*) {OVERRIDDEN} WHERE o.cluster = ? AND {in_range}",
                                   (label, low, high))[0][0]

    def page(self, label: int, limit: int = 60, descending: bool = True, min_conf: float = 0.0,
             max_conf: float = 1.0, after: Cursor | None = None, before: Cursor | None = None) -> list[Record]:
        """A page of a cluster by confidence (then id), the first one or the one just after (before) a cursor.

        Keyset paging: each predicted cluster feeding the label and the images moved in are read in index
        order from the cursor on, ``limit`` rows each, and merged; a page deep into a large cluster costs what
        the first does. ``before`` reads the opposite order from the cursor, then turns the page round.
        """
        if before is not None:
            rows = self._ordered(int(label), int(limit), not descending, True, float(min_conf), float(max_conf),
                                 before)
            return rows[::-1]
        return self._ordered(int(label), int(limit), descending, False, float(min_conf), float(max_conf), after)

    def seek(self, label: int, offset: int, descending: bool = True, min_conf: float = 0.0,
             max_conf: float = 1.0) -> Cursor | None:
        """The cursor after the first ``offset`` images (a jump to a page by number).

        From the generation's last checkpoint before the page (:meth:`_checkpoint`), walking fewer than a
        checkpoint spacing per merged cluster plus the overrides: the cost no longer grows with the page number.
        A confidence filter, the excluded images and an index without checkpoints walk every image before the
        page (the checkpoints rank the images a page without a filter reads; the excluded ones are overrides).
        """
        label, offset, low, high = int(label), int(offset), float(min_conf), float(max_conf)
        if offset <= 0:
            return None
        start, passed = None, 0
        if self.derived.checkpoints and (low, high) == (0.0, 1.0) and label != EXCLUDED:
            start, passed = self._checkpoint(label, offset, descending)
        rest = self._ordered(label, offset - passed, descending, False, low, high, start, keys=True)
        return rest[-1] if len(rest) == offset - passed else None

    def _checkpoint(self, label: int, offset: int, descending: bool) -> tuple[Cursor | None, int]:
        """The last checkpoint of a cluster feeding ``label`` with fewer than ``offset`` members at or before
        it, and that number (None, 0 when there is none).

        The members at or before a key are, per feeding cluster, its last checkpoint's rank less its images
        overridden up to that checkpoint plus its images not overridden between the checkpoint and the key (fewer
        than a spacing, read by keyset), and the images moved into ``label`` up to the key; the overrides are read
        once (their number, never N, sets the cost). The count never falls as the key goes on, so the checkpoints
        of all the feeding clusters, in page order, are searched by halves.
        """
        sources = self._sources(label)
        if not sources:
            return None, 0
        key = order_key(descending)
        marks = ",".join("?" * len(sources))
        out_keys: dict[int, list[tuple]] = {s: [] for s in sources}
        in_keys: list[tuple] = []
        for confidence, image_id, predicted, moved_in in self._query(  # one moved home is out, then in again
                f"SELECT i.{IMAGES.confidence}, i.{IMAGES.id}, i.{IMAGES.cluster}, o.cluster = ? {OVERRIDDEN} "
                f"WHERE (i.{IMAGES.cluster} IN ({marks}) OR o.cluster = ?) "
                f"AND COALESCE(i.{IMAGES.confidence}, 0) BETWEEN 0 AND 1", [label, *sources, label]):
            for keys in ([out_keys[predicted]] if predicted in out_keys else []) + ([in_keys] if moved_in else []):
                keys.append(key(confidence, image_id))
        for keys in (*out_keys.values(), in_keys):
            keys.sort()
        kept: dict[int, list[tuple[int, Cursor]]] = {s: [] for s in sources}
        for cluster, rank, confidence, image_id in self._query(
                f"SELECT cluster, rank, confidence, id FROM idx.{CHECKPOINTS_TABLE} WHERE cluster IN ({marks}) "
                "AND descending = ? ORDER BY cluster, rank", [*sources, int(descending)]):
            kept[cluster].append((rank, (confidence, image_id)))
        spots = {s: [key(*cursor) for _, cursor in kept[s]] for s in sources}

        def members(here: tuple) -> int:
            total = bisect.bisect_right(in_keys, here)
            for source in sources:
                n = bisect.bisect_right(spots[source], here)
                rank, cursor = kept[source][n - 1] if n else (0, None)
                total += rank - (bisect.bisect_right(out_keys[source], key(*cursor)) if cursor else 0)
                if cursor is None or key(*cursor) != here:  # the images left in between, by keyset
                    between = self._predicted(source, self.derived.checkpoints, descending, False, 0.0, 1.0, cursor,
                                              True)
                    total += bisect.bisect_right([key(*r) for r in between], here)
            return total

        candidates = sorted((cursor for s in sources for _, cursor in kept[s]), key=lambda c: key(*c))
        best: tuple[Cursor | None, int] = (None, 0)
        low, high = 0, len(candidates)
        while low < high:
            middle = (low + high) // 2
            count = members(key(*candidates[middle]))
            if count < offset:
                best, low = (candidates[middle], count), middle + 1
            else:
                high = middle
        return best

    def _ordered(self, label: int, limit: int, descending: bool, id_descending: bool, low: float, high: float,
                 after: Cursor | None, keys: bool = False) -> list[Any]:
        """The first ``limit`` images after the cursor, as Records (or, ``keys``, only their cursors: light rows
        without the joins a Record needs, for passing many)."""
        key = order_key(descending, id_descending)
        streams = [self._predicted(source, limit, descending, id_descending, low, high, after, keys)
                   for source in self._sources(label)]
        streams.append(self._moved_in(label, limit, descending, id_descending, low, high, after, keys))
        merged = heapq.merge(*streams, key=(lambda r: key(*r)) if keys else (lambda r: key(r.confidence, r.id)))
        return list(itertools.islice(merged, limit))

    def _predicted(self, source: int, limit: int, descending: bool, id_descending: bool, low: float, high: float,
                   after: Cursor | None, keys: bool) -> list[Any]:
        """Images predicted into ``source`` and not overridden, in page order after the cursor: the known
        confidences over the index (cluster, confidence), then the unknown ones (as 0) by id, or the reverse."""
        conf_dir, id_dir = ("DESC" if descending else "ASC"), ("DESC" if id_descending else "ASC")
        later = "<" if id_descending else ">"
        base = f"{KEYS_SQL if keys else RECORD_SQL} WHERE i.{IMAGES.cluster} = ? AND o.image_id IS NULL AND "
        row = tuple if keys else _record
        known: list[Any] = []
        unknown: list[Any] = []
        after_unknown = after is not None and after[0] is None
        if not (after_unknown and descending):  # unknowns come last when descending: a cursor there passed these
            lo, hi, tie = low, high, ""
            params: list[Any] = [source]
            if after is not None and after[0] is not None:
                lo, hi = (lo, min(hi, after[0])) if descending else (max(lo, after[0]), hi)
                tie = f" AND (i.{IMAGES.confidence} != ? OR i.{IMAGES.id} {later} ?)"
            params += [lo, hi]
            if tie:
                params += [after[0], after[1]]  # type: ignore[index]
            known = [row(r) for r in self._query(
                f"{base}i.{IMAGES.confidence} BETWEEN ? AND ?{tie} ORDER BY i.{IMAGES.confidence} {conf_dir}, "
                f"i.{IMAGES.id} {id_dir} LIMIT ?", [*params, limit])]
        if low <= 0.0 <= high and not (after is not None and after[0] is not None and not descending):
            params = [source]
            tie = ""
            if after_unknown:
                tie = f" AND i.{IMAGES.id} {later} ?"
                params.append(after[1])  # type: ignore[index]
            unknown = [row(r) for r in self._query(
                f"{base}i.{IMAGES.confidence} IS NULL{tie} ORDER BY i.{IMAGES.id} {id_dir} LIMIT ?", [*params, limit])]
        return known + unknown if descending else unknown + known

    def doubtful_page(self, label: int, offset: int, limit: int, min_conf: float = 0.0,
                      max_conf: float = 1.0) -> list[Record]:
        """A page of a cluster by descending review score (then id), images without a score last by id.

        The scores are walked in their index's order and each image's membership is tested by its keys, so a
        page costs the scores passed to reach it (its rank divided by the cluster's share), never a whole
        cluster; the unscored images (added since the scores) are read only once the scored ones ran out.
        """
        member, params = self._member_sql(int(label), float(min_conf), float(max_conf))
        scored = [_record(r) for r in self._query(
            f"{RECORD_COLUMNS} FROM idx.review r CROSS JOIN idx.{IMAGES.name} i ON i.{IMAGES.id} = r.id "
            f"LEFT JOIN overrides o ON o.image_id = r.id LEFT JOIN merges m ON m.cluster = i.{IMAGES.cluster} "
            f"LEFT JOIN confirmed c ON c.image_id = r.id WHERE {member} ORDER BY r.score DESC, r.id LIMIT ? OFFSET ?",
            [*params, int(limit), int(offset)])]
        if len(scored) == limit:
            return scored
        passed = offset + len(scored) if scored or offset == 0 else self._query(
            f"SELECT COUNT(*) FROM idx.review r CROSS JOIN idx.{IMAGES.name} i ON i.{IMAGES.id} = r.id "
            f"LEFT JOIN overrides o ON o.image_id = r.id WHERE {member}", params)[0][0]
        unscored = [_record(r) for r in self._query(
            f"{RECORD_SQL} WHERE {member} AND NOT EXISTS (SELECT 1 FROM idx.review r WHERE r.id = i.{IMAGES.id}) "
            f"ORDER BY i.{IMAGES.id} LIMIT ? OFFSET ?", [*params, limit - len(scored), max(0, offset - passed)])]
        return scored + unscored

    def _member_sql(self, label: int, low: float, high: float) -> tuple[str, list[Any]]:
        """Membership of ``label`` as a test on one image's keys (predicted into a source and not overridden, or
        moved in) with its confidence (unknown: 0) in the range."""
        sources = self._sources(label)
        marks = ",".join("?" * len(sources))
        predicted = f"(i.{IMAGES.cluster} IN ({marks}) AND o.image_id IS NULL) OR " if sources else ""
        return (f"({predicted}o.cluster = ?) AND COALESCE(i.{IMAGES.confidence}, 0) BETWEEN ? AND ?",
                [*sources, label, low, high])

    def _moved_in(self, label: int, limit: int, descending: bool, id_descending: bool, low: float, high: float,
                  after: Cursor | None, keys: bool) -> list[Any]:
        """Images moved into ``label`` (or excluded), in page order after the cursor (sorted: there are few)."""
        unknown, value = f"i.{IMAGES.confidence} IS NULL", f"COALESCE(i.{IMAGES.confidence}, 0)"
        id_term = f"-i.{IMAGES.id}" if id_descending else f"i.{IMAGES.id}"
        terms = (unknown, f"-{value}", id_term) if descending else (f"NOT {unknown}", value, id_term)
        where, params = f"o.cluster = ? AND {value} BETWEEN ? AND ?", [label, low, high]
        if after is not None:
            where += f" AND ({', '.join(terms)}) > (?, ?, ?)"
            params += list(order_key(descending, id_descending)(*after))
        rows = self._query(f"{KEYS_MOVED_SQL if keys else MOVED_SQL} WHERE {where} ORDER BY {', '.join(terms)} "
                           "LIMIT ?", [*params, limit])
        return [tuple(r) for r in rows] if keys else [_record(r) for r in rows]

    def records(self, ids: Sequence[int]) -> dict[int, Record]:
        found = chunked_in(self._query, f"{RECORD_SQL} WHERE i.{IMAGES.id} IN ({{marks}})", [int(i) for i in ids])
        return {row[0]: _record(row) for row in found}

    def records_after(self, after: int, limit: int) -> list[Record]:
        """The first ``limit`` images whose id is above ``after``, in id order (a keyset page of every image)."""
        rows = self._query(f"{RECORD_SQL} WHERE i.{IMAGES.id} > ? ORDER BY i.{IMAGES.id} LIMIT ?", (after, limit))
        return [_record(row) for row in rows]

    def iter_records(self, batch: int = 10_000) -> Iterator[Record]:
        """Every image in id order, streamed in batches (exports of any size)."""
        last = -1
        while rows := self.records_after(last, batch):
            yield from rows
            last = rows[-1].id

    def curated_records(self) -> Iterator[Record]:
        """Every image a person decided about: moved, excluded, confirmed, or in a cluster merged away."""
        last = -1
        while True:
            rows = self._query(f"{RECORD_SQL} WHERE i.{IMAGES.id} > ? AND (o.cluster IS NOT NULL "
                               "OR c.image_id IS NOT NULL OR m.into_cluster IS NOT NULL) "
                               f"ORDER BY i.{IMAGES.id} LIMIT 10000", (last,))
            if not rows:
                return
            yield from (_record(row) for row in rows)
            last = rows[-1][0]

    def merges(self) -> dict[int, int]:
        """Every cluster merged away -> the cluster it went into."""
        return dict(self._query("SELECT cluster, into_cluster FROM merges"))

    def sample(self, size: int) -> list[int]:
        """At most ``size`` ids drawn at random once per generation (the map, the merge suggestions)."""
        return list(self.derived.sample[:size])

    def history(self, limit: int = 10) -> list[str]:
        """The latest changes, newest first, as short sentences."""
        return [f"{at}  {action}" for action, at in
                self._query("SELECT action, at FROM undo_log ORDER BY seq DESC LIMIT ?", (limit,))]

    # ---- changing
    def _check_cluster(self, cluster: int) -> int:
        cluster = int(cluster)
        if not 0 <= cluster < self.n_clusters:
            raise CurationError(f"there is no cluster {cluster} (clusters are 0 to {self.n_clusters - 1})")
        return cluster

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """``BEGIN IMMEDIATE`` takes the write lock first, so what is read inside is what gets overwritten."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite may already have rolled back (disk full, ...)
                    self._db.execute("ROLLBACK")
                raise

    def _change(self, prepare: Callable[[], tuple[str, dict[str, dict[str, Any]], list[tuple[str, Sequence]]]]
                ) -> None:
        """Read with ``prepare()`` (action, what will be overwritten, statements), write and log it: one transaction."""
        with self._transaction():
            action, previous, statements = prepare()
            for sql, params in statements:
                self._db.execute(sql, params)
            self._db.execute("INSERT INTO undo_log (action, at, previous) VALUES (?, ?, ?)",
                             (action, time.strftime(ACTION_TIME_FORMAT), json.dumps(previous)))

    def _previous(self, table: str, key: str, value: str, keys: Sequence[int]) -> dict[str, Any]:
        found = dict(chunked_in(self._query, f"SELECT {key}, {value} FROM {table} WHERE {key} IN ({{marks}})",
                                [int(k) for k in keys]))
        return {str(k): found.get(int(k)) for k in keys}

    def rename(self, cluster: int, name: str) -> None:
        cluster, name = self._check_cluster(cluster), " ".join(str(name).split())
        if not name:
            raise CurationError("a cluster name cannot be empty")

        def prepare() -> tuple[str, dict, list]:
            clash = [c for c, n in self.names().items() if n.lower() == name.lower() and c != cluster]
            if clash:
                raise CurationError(f"cluster {clash[0]} is already called {name!r}")
            return (f"renamed cluster {cluster} from {self.name(cluster)!r} to {name!r}",
                    {"names": self._previous("names", "cluster", "name", [cluster])},
                    [("INSERT OR REPLACE INTO names (cluster, name) VALUES (?, ?)", (cluster, name))])

        self._change(prepare)

    def merge(self, sources: Sequence[int], target: int) -> None:
        """Merge ``sources`` into ``target``: their images (and anything moved into them) take its label.

        A target merged away meanwhile (by another user) resolves to the cluster it went into.
        """
        self.merge_groups([(sources, target)])

    def merge_groups(self, groups: Sequence[tuple[Sequence[int], int]], action: str | None = None) -> None:
        """Several merges, each (sources, target), as ONE change: one undo takes them all back (a merge plan).

        The groups must not share clusters; ``action`` describes the whole change (default: each merge).
        """
        checked = [({self._check_cluster(s) for s in sources}, self._check_cluster(target))
                   for sources, target in groups]
        if not checked:
            raise CurationError("nothing to merge")
        every = [c for wanted, target in checked for c in wanted | {target}]
        if len(every) != len(set(every)):
            raise CurationError("the merged groups share a cluster: each cluster may be in one group only")

        def prepare() -> tuple[str, dict, list]:
            actions, previous, statements = [], {"merges": {}, "overrides": {}}, []
            for wanted, target in checked:
                described, before, more = self._merge_statements(wanted, target)
                actions.append(described)
                for table, values in before.items():
                    for key, value in values.items():
                        previous[table].setdefault(key, value)  # the state before the first write wins
                statements += more
            return action or "; ".join(actions), previous, statements

        self._change(prepare)

    def _merge_statements(self, wanted: set[int], target: int) -> tuple[str, dict, list[tuple[str, Sequence]]]:
        """What merging ``wanted`` into ``target`` overwrites and writes (read inside the change's transaction)."""
        final = self.merged_into(target)
        chosen = sorted(wanted - {final})
        if not chosen:
            raise CurationError("choose at least one cluster other than the target to merge" if final == target
                                else f"cluster {target} was merged into {final} already")
        marks = ",".join("?" * len(chosen))
        chained = [r[0] for r in self._query(f"SELECT cluster FROM merges WHERE into_cluster IN ({marks})", chosen)]
        merged = sorted(set(chosen) | set(chained))
        moved = [r[0] for r in self._query(f"SELECT image_id FROM overrides WHERE cluster IN ({marks})", chosen)]
        previous = {"merges": self._previous("merges", "cluster", "into_cluster", merged),
                    "overrides": self._previous("overrides", "image_id", "cluster", moved)}
        statements: list[tuple[str, Sequence]] = [
            ("INSERT OR REPLACE INTO merges (cluster, into_cluster) VALUES (?, ?)", (c, final)) for c in merged]
        statements += [("UPDATE overrides SET cluster = ? WHERE image_id = ?", (final, i)) for i in moved]
        names = ", ".join(self.name(s) for s in chosen)
        return f"merged {names} into {self.name(final)}", previous, statements

    def move(self, ids: Sequence[int], target: int) -> int:
        """Move images to cluster ``target`` (or ``EXCLUDED``); returns how many exist and were moved."""
        wanted = EXCLUDED if int(target) == EXCLUDED else self._check_cluster(target)
        known = sorted(self.records(list({int(i) for i in ids})))  # the index is read-only: no race here
        if not known:
            raise CurationError("no images selected (or none of the given ids is in the index)")

        def prepare() -> tuple[str, dict, list]:
            final = EXCLUDED if wanted == EXCLUDED else self.merged_into(wanted)
            statements = [("INSERT OR REPLACE INTO overrides (image_id, cluster) VALUES (?, ?)", (i, final))
                          for i in known]
            verb = "excluded" if final == EXCLUDED else f"moved to {self.name(final)}"
            return (f"{verb}: {len(known)} image(s)",
                    {"overrides": self._previous("overrides", "image_id", "cluster", known)}, statements)

        self._change(prepare)
        return len(known)

    def confirm(self, ids: Sequence[int]) -> int:
        """Mark images' current clusters as right (``twist finetune`` learns from them); returns how many.

        Excluded images have no cluster to confirm and are passed over.
        """
        wanted = sorted({int(i) for i in ids})
        if not wanted:
            raise CurationError("no images selected to confirm")
        labels: dict[int, int] = {}

        def prepare() -> tuple[str, dict, list]:
            labels.update({r.id: r.label for r in self.records(wanted).values()
                           if r.label is not None and r.label != EXCLUDED})
            if not labels:
                raise CurationError("none of the selected images is in a cluster (excluded or not in the index)")
            clusters = sorted(set(labels.values()))
            where = self.name(clusters[0]) if len(clusters) == 1 else f"{len(clusters)} clusters"
            return (f"confirmed: {len(labels)} image(s) in {where}",
                    {"confirmed": self._previous("confirmed", "image_id", "cluster", list(labels))},
                    [("INSERT OR REPLACE INTO confirmed (image_id, cluster) VALUES (?, ?)", (i, c))
                     for i, c in labels.items()])

        self._change(prepare)
        return len(labels)

    def relabel(self, action: str, moves: Mapping[int, int], renames: Mapping[int, str]) -> None:
        """Renames and per-image moves as ONE change (one undo entry): labels made elsewhere, imported at once.

        Renames are checked together (two clusters may swap names); a move's target merged away meanwhile
        resolves to the cluster it went into; ids not in the index are the caller's to drop first.
        """
        renames = {self._check_cluster(c): " ".join(str(n).split()) for c, n in renames.items()}
        moves = {int(i): (EXCLUDED if int(c) == EXCLUDED else self._check_cluster(c)) for i, c in moves.items()}
        if any(not name for name in renames.values()):
            raise CurationError("a cluster name cannot be empty")

        def prepare() -> tuple[str, dict, list]:
            final_names = {**self.names(), **renames}
            seen: dict[str, int] = {}
            for cluster, name in final_names.items():
                if name.lower() in seen:
                    raise CurationError(f"clusters {seen[name.lower()]} and {cluster} would both be called {name!r}")
                seen[name.lower()] = cluster
            statements: list[tuple[str, Sequence]] = [
                ("INSERT OR REPLACE INTO names (cluster, name) VALUES (?, ?)", (c, n)) for c, n in renames.items()]
            final = {c: c if c == EXCLUDED else self.merged_into(c) for c in set(moves.values())}
            statements += [("INSERT OR REPLACE INTO overrides (image_id, cluster) VALUES (?, ?)", (i, final[c]))
                           for i, c in moves.items()]
            previous = {"names": self._previous("names", "cluster", "name", list(renames)),
                        "overrides": self._previous("overrides", "image_id", "cluster", list(moves))}
            return action, previous, statements

        self._change(prepare)

    def undo(self) -> str:
        """Restore what the last change overwrote; returns its description."""
        with self._transaction():
            last = self._db.execute("SELECT seq, action, previous FROM undo_log ORDER BY seq DESC LIMIT 1").fetchone()
            if last is None:
                raise CurationError("nothing to undo")
            seq, action, previous = last
            for table, values in json.loads(previous).items():
                key, column = UNDO_TABLES[table]
                for k, v in values.items():
                    if v is None:
                        self._db.execute(f"DELETE FROM {table} WHERE {key} = ?", (int(k),))
                    else:
                        self._db.execute(f"INSERT OR REPLACE INTO {table} ({key}, {column}) VALUES (?, ?)",
                                         (int(k), v))
            self._db.execute("DELETE FROM undo_log WHERE seq = ?", (seq,))
        return action
