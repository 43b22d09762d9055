"""The curation store's file as the rest of the pipeline sees it: where it lives, which model its decisions
were made for, and the cluster names it gives a reader (search, duplicates) that does not open the store.

The index never reads this file: a caller that wants the person's names on its hits passes
:class:`CuratedNames` to ``IndexReader.open`` (the index stage sits below curation).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from twist_core.errors import UserError
from twist_core.index.metadata import model_at
from twist_core.layout import CURATION_FILE

ACTION_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"  # when a change was made, in the curation store's undo log (local time)


class CurationError(UserError):
    """A curation request that cannot be applied (unknown cluster, nothing to undo, ...); says why."""


def curation_path(index_dir: str | Path, state_dir: str | Path | None = None) -> Path:
    """The curation store of an index: in the app's state folder, which is the index folder unless given."""
    return Path(state_dir or index_dir) / CURATION_FILE


def last_action_time(db: sqlite3.Connection) -> float | None:
    """When the newest change still in a curation store's undo log was made (None: none is logged)."""
    newest = db.execute("SELECT MAX(at) FROM undo_log").fetchone()[0]
    if newest is None:
        return None
    try:
        return time.mktime(time.strptime(newest, ACTION_TIME_FORMAT))
    except ValueError:
        return None


def store_model(db: sqlite3.Connection, info: dict[str, Any]) -> str | None:
    """The model a curation store's names, merges and moves refer to: the one it recorded, else (a store
    written before stores recorded it) the index's model when its last change was made."""
    bound = db.execute("SELECT value FROM binding WHERE key = 'model_sha256'").fetchall()
    return bound[0][0] if bound else model_at(info, last_action_time(db))


def curated_names(path: Path, info: dict[str, Any]) -> dict[int, str]:
    """Cluster names given in the app (its curation store at ``path``); none when there is no store, or when
    its names were given to the clusters of another model than the index's (``info``), or of another index."""
    if not path.is_file():
        return {}
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True, timeout=30)) as db:
            current = info.get("model_sha256")
            if current and store_model(db, info) not in (current, None):
                return {}
            bound = db.execute("SELECT value FROM binding WHERE key = 'index_uid'").fetchall()
            if bound and info.get("uid") and bound[0][0] != info["uid"]:
                return {}
            return {int(c): str(n) for c, n in db.execute("SELECT cluster, name FROM names")}
    except sqlite3.Error:  # a store being created, or not the app's: the card's names stand
        return {}


class CuratedNames:
    """The app's cluster names for an index's hits, read again only when the store's files changed (a stat per
    call, not a query). Pass it to ``IndexReader.open(..., names=...)``."""

    def __init__(self, index_dir: str | Path, state_dir: str | Path | None = None) -> None:
        self.path = curation_path(index_dir, state_dir)
        self._read: tuple[tuple, dict[int, str]] = ((), {})  # (the store files' stat, the names) read last

    def __call__(self, info: dict[str, Any]) -> dict[int, str]:
        stamp = tuple((s.st_mtime_ns, s.st_size) if (s := _stat(f)) else None
                      for f in (self.path, self.path.with_name(self.path.name + "-wal")))
        if stamp != self._read[0]:
            self._read = (stamp, curated_names(self.path, info))
        return self._read[1]


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None
