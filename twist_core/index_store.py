"""Where an index lives on disk: SQLite metadata beside the FAISS file, swapped in whole generations.

Layout of ``INDEX_DIR``::

    manifest.json          {"generation": N, "dir": "gen-00000N"}   (the only file ever overwritten)
    gen-00000N/index.faiss the CPU form of the FAISS index (vector id = images.id)
    gen-00000N/meta.sqlite images(id, path, cluster, ..., fingerprint) and info(key, value)
    .lock                  serialises writers

``images.path`` is relative to ``info["root"]`` and held as table text (:func:`twist_core.io_utils.path_to_text`:
a byte that is not UTF-8 as ``\\xNN``, a backslash doubled), as the labels tables write it; open the file with
``ImageIndex.file_of``.

An image keeps its id for as long as its file is unchanged (same path, size and modification time), even
across a rebuild over the same folder: the curation store and the thumbnail cache are keyed by that id.
``info["uid"]`` names the index's lineage; a fresh build in an emptied folder gets a new one.

An update writes a complete new generation under a temporary name, fsyncs it, renames it into place and
only then replaces the manifest, so a reader (or a crash at any moment) sees the old pair or the new one,
never an index from one update with metadata from another.
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
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from twist_core.io_utils import atomic_write_text, mark_output_folder

MANIFEST = "manifest.json"
INDEX_FILE = "index.faiss"
META_FILE = "meta.sqlite"
FAULT_ENV = "TWIST_INDEX_FAULT"  # stage name at which an update kills its own process (crash tests)
RECORD_ORDER = ("confidence", "margin", "path", "id", "cluster")
COLUMNS = ("id", "path", "cluster", "cluster_name", "confidence", "margin", "topk")

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, cluster INTEGER, cluster_name TEXT,
    confidence REAL, margin REAL, topk TEXT, fingerprint TEXT);
CREATE INDEX IF NOT EXISTS images_cluster ON images (cluster, confidence);
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT);
"""


class IndexUserError(Exception):
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
    path = index_dir / MANIFEST
    if not path.is_file():
        raise IndexUserError(f"no index in {index_dir} (build one: twist index LABELS --out {index_dir})")
    return json.loads(path.read_text())


@contextlib.contextmanager
def writer_lock(index_dir: Path) -> Iterator[None]:
    index_dir.mkdir(parents=True, exist_ok=True)
    with open(index_dir / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def commit_generation(index_dir: Path, index: faiss.Index, write_meta: Callable[[Path, int], None],
                      expected: int | None) -> Path:
    """Write ``index`` and the metadata made by ``write_meta(path, generation)`` as the next generation.

    ``expected`` is the generation the caller's state derives from (None for a fresh build); if another
    writer got there first the update is refused rather than silently dropping that writer's changes.
    """
    index_dir = Path(index_dir)
    mark_output_folder(index_dir)
    with writer_lock(index_dir):
        current = json.loads((index_dir / MANIFEST).read_text())["generation"] \
            if (index_dir / MANIFEST).is_file() else 0
        if expected is not None and current != expected:
            raise IndexChangedError(f"{index_dir} was updated by another process; open it again and retry")
        existing = [int(p.name[4:]) for p in index_dir.glob("gen-*") if p.name[4:].isdigit()]
        generation = max([current, *existing]) + 1
        tmp = index_dir / f".tmp-gen-{generation:06d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        final = index_dir / f"gen-{generation:06d}"
        try:
            tmp.mkdir()
            write_meta(tmp / META_FILE, generation)
            fault_point("meta-written")
            faiss.write_index(index, str(tmp / INDEX_FILE))
            for name in (META_FILE, INDEX_FILE):
                _fsync_path(tmp / name)
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


class MetaStore:
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
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(images)")}
        if "fingerprint" not in columns:
            self._db.execute("ALTER TABLE images ADD COLUMN fingerprint TEXT")

    def close(self) -> None:
        self._db.close()

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def copy_to(self, path: Path) -> MetaStore:
        """A writable copy (SQLite's online backup) on which an update is prepared."""
        target = MetaStore(path, readonly=False)
        with self._lock:
            self._db.backup(target._db)
        target._add_fingerprints()
        return target

    # ---- writing (only on a copy that is not yet published)
    def set_info(self, values: dict[str, Any]) -> None:
        self._db.executemany("INSERT OR REPLACE INTO info (key, value) VALUES (?, ?)",
                             [(k, json.dumps(v)) for k, v in values.items()])

    def insert(self, ids: Iterable[int], rows: Iterable[dict[str, Any]]) -> None:
        self._db.executemany(
            "INSERT INTO images (id, path, cluster, cluster_name, confidence, margin, topk, fingerprint) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(int(i), r["path"], r.get("cluster"), r.get("cluster_name"), r.get("confidence"),
              r.get("margin"), r.get("topk"), r.get("fingerprint")) for i, r in zip(ids, rows, strict=True)])

    def delete(self, ids: Iterable[int]) -> None:
        self._db.executemany("DELETE FROM images WHERE id = ?", [(int(i),) for i in ids])

    def commit(self) -> None:
        self._db.commit()

    # ---- tables that other modules own (the review scores of twist_core.review)
    def executescript(self, script: str) -> None:
        self._db.executescript(script)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self._db.executemany(sql, rows)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        return self._query(sql, params)

    # ---- reading
    def info(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self._query("SELECT key, value FROM info")}

    def count(self) -> int:
        return self._query("SELECT COUNT(*) FROM images")[0][0]

    def rows(self, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        found: dict[int, dict[str, Any]] = {}
        for start in range(0, len(ids), 900):  # SQLite's bound-parameter limit
            chunk = [int(i) for i in ids[start:start + 900]]
            marks = ",".join("?" * len(chunk))
            for row in self._query(f"SELECT {', '.join(COLUMNS)} FROM images WHERE id IN ({marks})", chunk):
                found[row[0]] = dict(zip(COLUMNS, row, strict=True))
        return found

    def ids_for_paths(self, paths: Sequence[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        for start in range(0, len(paths), 900):
            chunk = list(paths[start:start + 900])
            marks = ",".join("?" * len(chunk))
            found.update(self._query(f"SELECT path, id FROM images WHERE path IN ({marks})", chunk))
        return found

    def identities(self) -> dict[str, tuple[int, str | None]]:
        """Path -> (id, fingerprint) of every image; the fingerprint is None in indexes that predate it."""
        columns = {row[1] for row in self._query("PRAGMA table_info(images)")}
        fingerprint = "fingerprint" if "fingerprint" in columns else "NULL"
        return {path: (i, fp) for i, path, fp in self._query(f"SELECT id, path, {fingerprint} FROM images")}

    def all_ids(self) -> np.ndarray:
        return np.array([r[0] for r in self._query("SELECT id FROM images ORDER BY id")], dtype=np.int64)

    def all_paths(self) -> list[tuple[int, str]]:
        return self._query("SELECT id, path FROM images ORDER BY id")

    def ids_in_cluster(self, cluster: int) -> np.ndarray:
        rows = self._query("SELECT id FROM images WHERE cluster = ? ORDER BY id", (int(cluster),))
        return np.array([r[0] for r in rows], dtype=np.int64)

    def clusters(self) -> list[int]:
        return [r[0] for r in self._query("SELECT DISTINCT cluster FROM images WHERE cluster IS NOT NULL "
                                          "ORDER BY cluster")]

    def records(self, cluster: int | None, order_by: str, descending: bool, offset: int, limit: int,
                min_conf: float, max_conf: float) -> list[dict[str, Any]]:
        if order_by not in RECORD_ORDER:
            raise IndexUserError(f"cannot order by {order_by!r}; choose one of {', '.join(RECORD_ORDER)}")
        where, params = ["COALESCE(confidence, 0) BETWEEN ? AND ?"], [float(min_conf), float(max_conf)]
        if cluster is not None:
            where.append("cluster = ?")
            params.append(int(cluster))
        direction = "DESC" if descending else "ASC"
        sql = (f"SELECT {', '.join(COLUMNS)} FROM images WHERE {' AND '.join(where)} "
               f"ORDER BY {order_by} {direction}, id LIMIT ? OFFSET ?")
        found = self._query(sql, [*params, int(limit), int(offset)])
        return [dict(zip(COLUMNS, row, strict=True)) for row in found]

    def cluster_summary(self) -> list[dict[str, Any]]:
        rows = self._query("SELECT cluster, MAX(cluster_name), COUNT(*), AVG(confidence) FROM images "
                           "GROUP BY cluster ORDER BY cluster")
        return [{"cluster": c, "name": n, "size": s, "mean_confidence": m} for c, n, s, m in rows]
