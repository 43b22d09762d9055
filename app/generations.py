"""The index generation the app serves, and the model that labelled it, followed while the server runs.

``twist index --update`` commits a new generation beside the old one and points the manifest at it; a damaged
metadata file can be replaced by a whole one. :class:`ServedIndex` notices both with one ``stat`` per file on
each access, opens what the manifest names now, and keeps serving the generation open (saying why) when the new
files cannot be read. The workspace owns one and is told of a switch through a callback, so that the curation
store follows the generation in the same step.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

from app.results import AppUserError
from twist_core.curate.store_file import CurationError
from twist_core.deploy.infer import OnnxModel
from twist_core.index.image_index import IndexReader
from twist_core.index.metadata import IndexUserError, meta_path, read_manifest
from twist_core.io_utils import file_sha256
from twist_core.layout import MANIFEST, META_FILE

log = logging.getLogger("twist.app")

Attach = Callable[[Path, "OnnxModel | None"], None]  # (new generation's metadata, the new model if it changed)


def file_stamp(path: Path) -> tuple[int, int, int] | None:
    """Inode, modification time and size: any of them changes when a file is rewritten or replaced."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def check_whole(metadata: Path) -> None:
    """Refuse a metadata file that is not whole (cut short, overwritten): SQLite's quick check reads every page.

    Run when the app follows a change of the index's files, so a damaged file is said, not served.
    """
    try:
        with contextlib.closing(sqlite3.connect(f"file:{metadata.resolve()}?mode=ro", uri=True)) as db:
            verdict = str(db.execute("PRAGMA quick_check(1)").fetchone()[0])
    except sqlite3.Error as error:
        verdict = str(error)
    if verdict != "ok":
        raise IndexUserError(f"{metadata} is damaged ({verdict}): restore it, or build the index again with "
                             f"twist index --out {metadata.parent.parent}")


class ServedIndex:
    """The generation served (:attr:`index`, :attr:`meta_path`), its model, and what is wrong with the files now."""

    def __init__(self, model_path: Path, index_dir: Path, device: str) -> None:
        self.index_dir, self.device = Path(index_dir), device
        manifest_stamp = file_stamp(self.index_dir / MANIFEST)  # before opening: a change meanwhile is followed
        self.model_path = Path(model_path)
        self.model = OnnxModel(self.model_path, device=device)
        self.model_sha = file_sha256(self.model_path)
        self.index, self.meta_path = self._open_generation()
        self._model_for(self.index, follow=False)
        self._files_stamp = (manifest_stamp, file_stamp(self.meta_path))  # the files as last seen
        self.problem: str | None = None  # what is wrong with the index's files now, for the page
        self._lock = threading.Lock()

    def _open_generation(self) -> tuple[IndexReader, Path]:
        """The index generation the manifest names and its metadata file."""
        for _ in range(3):
            index = IndexReader.open(self.index_dir, self.device)
            manifest = read_manifest(self.index_dir)
            if manifest["generation"] != index.generation:  # a writer committed meanwhile: open that one
                index.close()
                continue
            return index, self.index_dir / manifest["dir"] / META_FILE
        raise AppUserError(f"{self.index_dir} keeps changing while the app opens it; try again")

    def _model_for(self, index: IndexReader, follow: bool) -> tuple[OnnxModel, str]:
        """The model to serve ``index`` with, and its fingerprint: the one open, or (``follow``, after
        ``twist index --update`` relabelled the index with another model) the model the index names.

        At start the index must come from the model given: its clusters are that model's.
        """
        recorded, model, sha = index.info.get("model_sha256"), self.model, self.model_sha
        if recorded is not None and recorded != sha:
            path = index.info.get("model")
            if not follow:
                index.close()
                raise AppUserError(f"the labels in {self.index_dir} come from another model ({path}) than "
                                   f"{self.model_path}: start the app with --model {path}, or relabel the index with "
                                   f"twist index --update --out {self.index_dir} --model {self.model_path}")
            if not path or not Path(path).is_file() or file_sha256(path) != recorded:
                raise AppUserError(f"{self.index_dir} was relabelled by a model that is no longer at {path}")
            model, sha = OnnxModel(path, device=self.device), recorded
        if index.dim != model.embedding_dim:
            index.close()
            raise AppUserError(f"the model gives {model.embedding_dim}-d embeddings but the index holds "
                               f"{index.dim}-d vectors; use the model the index was built with")
        return model, sha

    def keep_up(self, attach: Attach) -> bool:
        """Follow the index's files; True when another generation (or a repaired file) is served from now on.

        A check is one ``stat`` of the manifest and one of the served metadata file. When either changed, what
        the manifest names now is opened afresh; ``attach`` is called with its metadata file (and the model, when
        the update relabelled with another one) before it is served, and may refuse it by raising. If it cannot
        be read, the generation open goes on being served and :attr:`problem` says why until the files are whole.
        """
        manifest = file_stamp(self.index_dir / MANIFEST)
        if (manifest, file_stamp(self.meta_path)) == self._files_stamp:
            return False
        with self._lock:
            if (manifest, file_stamp(self.meta_path)) == self._files_stamp:
                return False
            switched = self._switch(attach)
            self._files_stamp = (manifest, file_stamp(self.meta_path))
            return switched

    def _say(self, message: str) -> None:
        """Say what is wrong with the index's files: in the log once, and on the page while it lasts."""
        if message != self.problem:
            log.warning(message)
        self.problem = message

    def _switch(self, attach: Attach) -> bool:
        current = self.index
        try:
            check_whole(meta_path(self.index_dir))  # before FAISS loads a generation that cannot be served
            fresh, fresh_meta = self._open_generation()
        except (AppUserError, IndexUserError, OSError, ValueError, RuntimeError, sqlite3.Error) as error:
            self._say(f"the index cannot be read: {error}; still serving generation {current.generation} as "
                      "far as it can be read (the app follows the files again once they are whole)")
            return False
        if fresh.info.get("uid") != current.info.get("uid"):
            fresh.close()
            self._say(f"{self.index_dir} now holds another index (a new build, not an update): its ids name "
                      "other images; restart the app to open it")
            return False
        try:
            model, sha = self._model_for(fresh, follow=True)
            attach(fresh_meta, model if sha != self.model_sha else None)
        except (AppUserError, CurationError, sqlite3.Error, ValueError, OSError) as error:
            fresh.close()
            self._say(f"{error}; still serving generation {current.generation}")
            return False
        if sha != self.model_sha:  # relabelled by another model: serve it, with its clusters' names
            self.model, self.model_sha, self.model_path = model, sha, Path(model.path)
            log.warning("%s was relabelled by another model: now serving %s", self.index_dir, model.path)
        # not closed here: requests in flight may still hold the generation retired now (an export, a
        # batch), and two more updates may commit before they finish; it closes once none holds it
        self.index, self.meta_path = fresh, fresh_meta
        if self.problem:
            log.warning("the index's files are whole again")
            self.problem = None
        log.info("now serving generation %d of %s (%d images)", fresh.generation, self.index_dir, fresh.size)
        return True
