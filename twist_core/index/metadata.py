"""Where an index lives on disk: SQLite metadata beside the FAISS file, swapped in whole generations.

Layout of ``INDEX_DIR``::

    manifest.json          {"generation": N, "dir": "gen-00000N"}   (the only file ever overwritten)
    gen-00000N/index.faiss the CPU form of the FAISS index (vector id = images.id): the base, maybe hard-linked
    gen-00000N/delta-*.npz the updates applied to that base since it was written (:mod:`twist_core.index.delta`)
    gen-00000N/meta.sqlite images(id, path, cluster, ..., fingerprint) and info(key, value)
    .lock                  serialises writers
    curation.sqlite        the app's curation store (cluster names, merges, moves), unless it has another state dir

``images.path`` is relative to ``info["root"]`` and held as table text (:func:`twist_core.io_utils.path_to_text`:
a byte that is not UTF-8 as ``\\xNN``, a backslash doubled), as the labels tables write it; open the file with
``IndexReader.file_of``.

An image keeps its id for as long as its file is unchanged (same path, size and modification time), even
across a rebuild over the same folder: the curation store and the thumbnail cache are keyed by that id.
``info["uid"]`` names the index's lineage; a fresh build in an emptied folder gets a new one.

An update writes a complete new generation under a temporary name (the FAISS base linked, its change as a
step beside it), fsyncs it, renames it into place and only then replaces the manifest, so a reader (or a crash
at any moment) sees the old pair or the new one, never an index from one update with metadata from another.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from twist_core.errors import UserError
from twist_core.index.delta import Step, write_index
from twist_core.io_utils import atomic_write_text, mark_output_folder
from twist_core.layout import INFO_TABLE, MANIFEST, META_FILE

FAULT_ENV = "TWIST_INDEX_FAULT"  # stage name at which an update kills its own process (crash tests)
SQL_CHUNK = 900  # values per ``IN (...)``: below SQLite's bound-parameter limit


@dataclass(frozen=True)
class ImagesTable:
    """The metadata table's name and column names, for every module that reads it (the app's curation too)."""

    name: str = "images"
    id: str = "id"
    path: str = "path"
    cluster: str = "cluster"
    cluster_name: str = "cluster_name"  # the model card's name when the image was indexed; readers show current
    confidence: str = "confidence"
    margin: str = "margin"
    topk: str = "topk"
    fingerprint: str = "fingerprint"


IMAGES = ImagesTable()
RECORD_ORDER = (IMAGES.confidence, IMAGES.margin, IMAGES.path, IMAGES.id, IMAGES.cluster)
COLUMNS = (IMAGES.id, IMAGES.path, IMAGES.cluster, IMAGES.cluster_name, IMAGES.confidence, IMAGES.margin,
           IMAGES.topk)

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {IMAGES.name} (
    {IMAGES.id} INTEGER PRIMARY KEY, {IMAGES.path} TEXT UNIQUE NOT NULL, {IMAGES.cluster} INTEGER,
    {IMAGES.cluster_name} TEXT, {IMAGES.confidence} REAL, {IMAGES.margin} REAL, {IMAGES.topk} TEXT,
    {IMAGES.fingerprint} TEXT);
CREATE INDEX IF NOT EXISTS images_cluster ON {IMAGES.name} ({IMAGES.cluster}, {IMAGES.confidence});
CREATE INDEX IF NOT EXISTS images_cluster_desc ON {IMAGES.name} ({IMAGES.cluster}, {IMAGES.confidence} DESC);
CREATE TABLE IF NOT EXISTS {INFO_TABLE} (key TEXT PRIMARY KEY, value TEXT);
"""


def chunked_in(query: Callable[[str, Sequence[Any]], list[tuple]], sql: str, values: Sequence[Any],
               before: Sequence[Any] = ()) -> list[tuple]:
    """Run ``sql`` (holding one ``{marks}`` inside ``IN (...)``) over ``values`` in SQLite-sized chunks.

    ``before`` are parameters that come ahead of the ``IN`` list in every chunk.
    """
    found: list[tuple] = []
    for start in range(0, len(values), SQL_CHUNK):
        chunk = list(values[start:start + SQL_CHUNK])
        found += query(sql.format(marks=",".join("?" * len(chunk))), [*before, *chunk])
    return found


def meta_path(index_dir: Path) -> Path:
    """The metadata database of the generation the manifest names now."""
    return Path(index_dir) / read_manifest(Path(index_dir))["dir"] / META_FILE


class IndexUserError(UserError):
    """A problem the user can fix (missing index, wrong dimension, unknown id); the message says which."""


class IndexChangedError(IndexUserError):
    """Another process committed an update after this index was opened."""


def fault_point(stage: str) -> None:
    """Die here, like a power cut, when the crash tests ask for it."""
    if os.environ.get(FAULT_ENV) == stage:
        os._exit(75)


def file_fingerprint(path: Path) -> str | None:
    """Size and modification time: a changed file is a new image, without reading every file again."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return f"{stat.st_size}:{stat.st_mtime_ns}"


WRITE_FAILURES = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
WRITE_FAILURE_WORDS = ("No space left", "Disk quota", "File too large", "database or disk is full",
                       "disk I/O error")


def write_failure(error: BaseException, where: str | Path) -> str | None:
    """One sentence for a write that failed for lack of space (OS, SQLite or FAISS wording), else None."""
    if isinstance(error, OSError) and error.errno in WRITE_FAILURES:
        reason = os.strerror(error.errno)
    else:
        reason = next((word for word in WRITE_FAILURE_WORDS if word in str(error)), None)
        if reason is None:
            return None
    return (f"could not write to {where} ({reason}): the disk is full or a size limit was hit; free some "
            "space and run again (the previous index is unchanged)")


def new_uid() -> str:
    return uuid.uuid4().hex


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(index_dir: Path) -> dict[str, Any]:
    """The manifest: which generation folder is the index now. Damaged, it is one line saying so, not a trace."""
    path = index_dir / MANIFEST
    if not path.is_file():
        raise IndexUserError(f"no index in {index_dir} (build one: twist index LABELS --out {index_dir})")
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest["generation"], int) or Path(str(manifest["dir"])).name != manifest["dir"]:
            raise ValueError
    except (ValueError, TypeError, KeyError):
        raise IndexUserError(f"{path} is damaged (not the generation number and folder twist writes): restore it, "
                             f"or build the index again with twist index --out {index_dir}") from None
    return manifest


@contextlib.contextmanager
def writer_lock(index_dir: Path) -> Iterator[None]:
    index_dir.mkdir(parents=True, exist_ok=True)
    with open(index_dir / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _finish_meta(path: Path) -> None:
    """Every generation gets the current indexes (an update's copy keeps an older index's) and its derived tables."""
    from twist_core.index.derived import write_derived  # it reads this module's table names

    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(SCHEMA)
        write_derived(db)


def commit_generation(index_dir: Path, index: faiss.Index, write_meta: Callable[[Path, int], None],
                      expected: int | None, step: Step | None = None) -> Path:
    """Write ``index`` and the metadata made by ``write_meta(path, generation)`` as the next generation.

    ``expected`` is the generation the caller's state derives from (None for a fresh build); if another
    writer got there first the update is refused rather than silently dropping that writer's changes.
    ``step``: what turned generation ``expected``'s index into ``index``; given, the FAISS side is written as
    that step beside the previous base (:func:`twist_core.index.delta.write_index`).
    """
    index_dir = Path(index_dir)
    mark_output_folder(index_dir)
    with writer_lock(index_dir):
        current = json.loads((index_dir / MANIFEST).read_text())["generation"] \
            if (index_dir / MANIFEST).is_file() else 0
        if expected is not None and current != expected:
            raise IndexChangedError(f"{index_dir} was updated by another process; open it again and retry")
        previous = index_dir / read_manifest(index_dir)["dir"] if expected is not None and current else None
        existing = [int(p.name[4:]) for p in index_dir.glob("gen-*") if p.name[4:].isdigit()]
        generation = max([current, *existing]) + 1
        tmp = index_dir / f".tmp-gen-{generation:06d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        final = index_dir / f"gen-{generation:06d}"
        try:
            tmp.mkdir()
            write_meta(tmp / META_FILE, generation)
            _finish_meta(tmp / META_FILE)
            fault_point("meta-written")
            write_index(tmp, index, previous, step, generation)
            for path in [*tmp.iterdir(), tmp]:
                _fsync_path(path)
            fault_point("index-written")
            os.rename(tmp, final)
            _fsync_path(index_dir)
            fault_point("before-manifest")
            manifest = {"generation": generation, "dir": final.name}
            atomic_write_text(index_dir / MANIFEST, json.dumps(manifest) + "\n")
        except BaseException as error:  # the manifest still names the previous generation: drop this one
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(final, ignore_errors=True)
            message = write_failure(error, index_dir)
            if message:
                raise IndexUserError(message) from None
            raise
        _fsync_path(index_dir)
        fault_point("after-manifest")
        for stale in [*index_dir.glob("gen-*"), *index_dir.glob(".tmp-gen-*")]:
            if stale != final:
                shutil.rmtree(stale, ignore_errors=True)
    return final


class IndexMetadata:
    """The SQLite side of one generation: id -> path, cluster, confidence; plus the index's ``info``."""

    def __init__(self, path: Path, readonly: bool = True) -> None:
        self.path = Path(path)
        uri = f"file:{self.path}?mode=ro" if readonly else f"file:{self.path}"
        self._db = sqlite3.connect(uri, uri=True, check_same_thread=False)
        self._lock = threading.Lock()  # one connection shared by the web app's worker threads
        if not readonly:
            self._db.executescript(SCHEMA)
            self._add_fingerprints()

    def _add_fingerprints(self) -> None:
        """Indexes written before fingerprints existed get the column (empty: such images match by path)."""
        columns = {row[1] for row in self._db.execute(f"PRAGMA table_info({IMAGES.name})")}
        if IMAGES.fingerprint not in columns:
            self._db.execute(f"ALTER TABLE {IMAGES.name} ADD COLUMN {IMAGES.fingerprint} TEXT")

    def close(self) -> None:
        self._db.close()

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def copy_to(self, path: Path) -> IndexMetadata:
        """A writable copy on which an update is prepared: a plain file copy (in the kernel), since a published
        generation's file is complete and never written again (committed and closed, so no journal beside it)."""
        shutil.copyfile(self.path, path)
        return IndexMetadata(path, readonly=False)

    # ---- writing (only on a copy that is not yet published)
    def set_info(self, values: dict[str, Any]) -> None:
        self._db.executemany(f"INSERT OR REPLACE INTO {INFO_TABLE} (key, value) VALUES (?, ?)",
                             [(k, json.dumps(v)) for k, v in values.items()])

    def insert(self, ids: Iterable[int], rows: Iterable[dict[str, Any]]) -> None:
        self._db.executemany(
            f"INSERT INTO {IMAGES.name} ({', '.join(COLUMNS)}, {IMAGES.fingerprint}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(int(i), r["path"], r.get("cluster"), r.get("cluster_name"), r.get("confidence"),
              r.get("margin"), r.get("topk"), r.get("fingerprint")) for i, r in zip(ids, rows, strict=True)])

    def delete(self, ids: Iterable[int]) -> None:
        """Drop images, and their review scores with them (the kept count of scored images is that table's)."""
        gone = [(int(i),) for i in ids]
        self._db.executemany(f"DELETE FROM {IMAGES.name} WHERE {IMAGES.id} = ?", gone)
        if self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'review'").fetchone():
            self._db.executemany("DELETE FROM review WHERE id = ?", gone)

    def commit(self) -> None:
        self._db.commit()

    # ---- tables that other modules own (the review scores of twist_core.label.review)
    def executescript(self, script: str) -> None:
        self._db.executescript(script)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self._db.executemany(sql, rows)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        return self._query(sql, params)

    # ---- reading
    def info(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self._query(f"SELECT key, value FROM {INFO_TABLE}")}

    def count(self) -> int:
        return self._query(f"SELECT COUNT(*) FROM {IMAGES.name}")[0][0]

    def rows(self, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        found = chunked_in(self._query, f"SELECT {', '.join(COLUMNS)} FROM {IMAGES.name} "
                           f"WHERE {IMAGES.id} IN ({{marks}})", [int(i) for i in ids])
        return {row[0]: dict(zip(COLUMNS, row, strict=True)) for row in found}

    def ids_for_paths(self, paths: Sequence[str]) -> dict[str, int]:
        return dict(chunked_in(self._query, f"SELECT {IMAGES.path}, {IMAGES.id} FROM {IMAGES.name} "
                               f"WHERE {IMAGES.path} IN ({{marks}})", list(paths)))

    def identities(self, paths: Sequence[str] | None = None) -> dict[str, tuple[int, str | None]]:
        """Path -> (id, fingerprint) of every image (of those of ``paths`` that are indexed, when given); the
        fingerprint is None in indexes that predate it."""
        columns = {row[1] for row in self._query(f"PRAGMA table_info({IMAGES.name})")}
        fingerprint = IMAGES.fingerprint if IMAGES.fingerprint in columns else "NULL"
        sql = f"SELECT {IMAGES.id}, {IMAGES.path}, {fingerprint} FROM {IMAGES.name}"
        found = self._query(sql) if paths is None else chunked_in(
            self._query, sql + f" WHERE {IMAGES.path} IN ({{marks}})", list(paths))
        return {path: (i, fp) for i, path, fp in found}

    def all_ids(self) -> np.ndarray:
        found = self._query(f"SELECT {IMAGES.id} FROM {IMAGES.name} ORDER BY {IMAGES.id}")
        return np.array([r[0] for r in found], dtype=np.int64)

    def all_paths(self) -> list[tuple[int, str]]:
        return self._query(f"SELECT {IMAGES.id}, {IMAGES.path} FROM {IMAGES.name} ORDER BY {IMAGES.id}")

    def ids_in_cluster(self, cluster: int) -> np.ndarray:
        rows = self._query(f"SELECT {IMAGES.id} FROM {IMAGES.name} WHERE {IMAGES.cluster} = ? ORDER BY {IMAGES.id}",
                           (int(cluster),))
        return np.array([r[0] for r in rows], dtype=np.int64)

    def clusters(self) -> list[int]:
        return [r[0] for r in self._query(f"SELECT DISTINCT {IMAGES.cluster} FROM {IMAGES.name} "
                                          f"WHERE {IMAGES.cluster} IS NOT NULL ORDER BY {IMAGES.cluster}")]

    def records(self, cluster: int | None, order_by: str, descending: bool, offset: int, limit: int,
                min_conf: float, max_conf: float) -> list[dict[str, Any]]:
        if order_by not in RECORD_ORDER:
            raise IndexUserError(f"cannot order by {order_by!r}; choose one of {', '.join(RECORD_ORDER)}")
        where, params = [f"COALESCE({IMAGES.confidence}, 0) BETWEEN ? AND ?"], [float(min_conf), float(max_conf)]
        if cluster is not None:
            where.append(f"{IMAGES.cluster} = ?")
            params.append(int(cluster))
        direction = "DESC" if descending else "ASC"
        sql = (f"SELECT {', '.join(COLUMNS)} FROM {IMAGES.name} WHERE {' AND '.join(where)} "
               f"ORDER BY {order_by} {direction}, {IMAGES.id} LIMIT ? OFFSET ?")
        found = self._query(sql, [*params, int(limit), int(offset)])
        return [dict(zip(COLUMNS, row, strict=True)) for row in found]

    def stored_names(self) -> dict[int, str]:
        """Each cluster's name as written when its images were indexed (the model card's at that time)."""
        return {c: n for c, n in self._query(f"SELECT {IMAGES.cluster}, MAX({IMAGES.cluster_name}) FROM {IMAGES.name} "
                                             f"WHERE {IMAGES.cluster} IS NOT NULL GROUP BY {IMAGES.cluster}")
                if n is not None}

    def cluster_summary(self) -> list[dict[str, Any]]:
        rows = self._query(f"SELECT {IMAGES.cluster}, MAX({IMAGES.cluster_name}), COUNT(*), AVG({IMAGES.confidence}) "
                           f"FROM {IMAGES.name} GROUP BY {IMAGES.cluster} ORDER BY {IMAGES.cluster}")
        return [{"cluster": c, "name": n, "size": s, "mean_confidence": m} for c, n, s, m in rows]


UNKNOWN_MODEL = "unknown"


def model_history(previous: dict[str, Any], model_sha256: str | None, now: float) -> list[dict[str, Any]]:
    """The index's models in order, each with the time its labels came in (``since``, seconds since the epoch;
    None when older than this record). A curation store that never wrote down its model reads from it which
    model its clusters were of (:func:`store_model`)."""
    history = list(previous.get("model_history") or [])
    if not history and previous.get("model_sha256"):
        history = [{"model_sha256": previous["model_sha256"], "since": None}]
    if model_sha256 and (not history or history[-1]["model_sha256"] != model_sha256):
        history.append({"model_sha256": model_sha256, "since": now})
    return history


def model_at(info: dict[str, Any], moment: float | None) -> str | None:
    """The model whose clusters the index held at ``moment``: its current model when it never changed,
    :data:`UNKNOWN_MODEL` when it changed and the moment is unknown."""
    history = info.get("model_history") or []
    if len(history) < 2:
        return info.get("model_sha256")
    if moment is None:
        return UNKNOWN_MODEL
    before = [entry for entry in history if entry["since"] is None or entry["since"] <= moment]
    return (before[-1] if before else history[0])["model_sha256"]
