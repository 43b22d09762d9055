"""Query and update an image index: nearest neighbours by vector, id or image; add, remove, find duplicates.

An :class:`IndexReader` pairs a FAISS index (vector id = image id) with the SQLite metadata of the same
generation (see :mod:`twist_core.index.metadata`), so an id always resolves to its image; it looks images up and
searches. An :class:`IndexWriter` also adds and removes: every update writes a new generation and swaps it in
atomically, and if anything fails the object reloads the last committed state. :func:`find_duplicates` and
:func:`embed_rows` work on them. Build one with :func:`twist_core.index.build.build_index` (``twist index``).

Hits show each cluster's current name: the one the caller's name source gives (``names``: the app's curation
store, ``twist_core.curate.store_file.CuratedNames``) where the person renamed it, else the model card's the
images were labelled with.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import faiss
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from twist_core.data.folder import ImageReadError, decode_image
from twist_core.index import review_table
from twist_core.index.delta import Step, read_index
from twist_core.index.metadata import (
    IndexMetadata,
    IndexUserError,
    commit_generation,
    file_fingerprint,
    new_uid,
    read_manifest,
)
from twist_core.index.recall import measured_recall
from twist_core.index.stream import CHUNK
from twist_core.io_utils import path_from_text
from twist_core.label.table import label_rows
from twist_core.layout import META_FILE
from twist_core.vectors import (
    IndexPlan,
    build,
    normalized,
    resolve_device,
    search_params,
    set_nprobe,
    to_device,
    training_size,
)

Opened = TypeVar("Opened", bound="IndexReader")


@dataclass(frozen=True)
class Hit:
    """One image in a result; ``similarity`` is the cosine to the query (None when listing records).

    ``path`` is table text (a byte that is not UTF-8 as ``\\xNN``, see :func:`twist_core.io_utils.path_to_text`),
    fit to print and store; ``abs_path`` is the real file to open.
    """

    id: int
    path: str
    abs_path: Path
    similarity: float | None
    cluster: int | None
    cluster_name: str | None
    confidence: float | None


NameSource = Callable[[dict[str, Any]], dict[int, str]]  # the index's info -> names a person gave its clusters


class IndexReader:
    """A FAISS index plus its metadata, loaded from one committed generation of ``index_dir``: look-ups, search."""

    def __init__(self, index_dir: Path, generation: int, cpu_index: faiss.Index, meta: IndexMetadata,
                 device: str, names: NameSource | None = None) -> None:
        self.index_dir = Path(index_dir)
        self.names = names
        self.generation = generation
        self.device = device
        self._cpu = cpu_index
        self._hold(meta)
        self._info = meta.info()
        self._lock = threading.RLock()  # reads never see an update half-applied (FAISS index or metadata)
        if self._cpu.ntotal != meta.count():
            raise IndexUserError(f"{index_dir}: index holds {self._cpu.ntotal} vectors but metadata "
                                 f"{meta.count()} images; rebuild it with twist index")
        set_nprobe(self._cpu, self.nprobe)
        self._search = to_device(self._cpu, device)

    @classmethod
    def open(cls: type[Opened], index_dir: str | Path, device: str = "auto",
             names: NameSource | None = None) -> Opened:
        """The generation named by the manifest; retried if a writer swaps generations while we read.

        ``names``: where hits take the names a person gave clusters (None: the card's names only).
        """
        index_dir = Path(index_dir)
        device = resolve_device(device)
        for _ in range(5):
            manifest = read_manifest(index_dir)
            folder = index_dir / manifest["dir"]
            try:
                meta = IndexMetadata(folder / META_FILE)
                meta.count()
                cpu_index = read_index(folder)
            except (RuntimeError, sqlite3.Error) as error:
                if read_manifest(index_dir) != manifest:
                    continue
                reason = str(error).splitlines()[0]
                raise IndexUserError(f"index in {index_dir} cannot be read ({reason})") from error
            return cls(index_dir, manifest["generation"], cpu_index, meta, device, names)
        raise IndexUserError(f"{index_dir} keeps changing under us; try again")

    # ---- properties
    @property
    def size(self) -> int:
        return int(self._cpu.ntotal)

    @property
    def dim(self) -> int:
        return int(self._cpu.d)

    @property
    def root(self) -> Path:
        return Path(self._info["root"])

    def file_of(self, path: str) -> Path:
        """The file to open for an indexed path (table text, as :attr:`Hit.path` and :meth:`paths` give it)."""
        return self.root / path_from_text(path)

    @property
    def kind(self) -> str:
        return str(self._info["kind"])

    @property
    def nprobe(self) -> int:
        return int(self._info.get("nprobe", 0))

    @property
    def info(self) -> dict[str, Any]:
        return dict(self._info)

    def cluster_names(self) -> dict[int, str]:
        """Each cluster's current name: renamed in the app, else as the model card named it at indexing."""
        with self._lock:
            stored = self._meta.stored_names()
        return {**stored, **self._renamed()}

    def _renamed(self) -> dict[int, str]:
        """The names the caller's source gives (a person's renames), none without one."""
        return self.names(self._info) if self.names else {}

    # ---- lookups
    def _hit(self, row: dict[str, Any], similarity: float | None, names: dict[int, str]) -> Hit:
        name = names.get(row["cluster"], row["cluster_name"]) if row["cluster"] is not None else None
        return Hit(row["id"], row["path"], self.file_of(row["path"]), similarity, row["cluster"], name,
                   row["confidence"])

    def _hits(self, ids: np.ndarray, sims: np.ndarray | None) -> list[Hit]:
        keep = [int(i) for i in ids if i >= 0]
        rows, names = self._meta.rows(keep), self._renamed()
        return [self._hit(rows[i], None if sims is None else float(sims[pos]), names) for pos, i in enumerate(keep)]

    def get(self, image_id: int) -> Hit:
        with self._lock:
            if not self._meta.rows([image_id]):
                raise IndexUserError(f"no image with id {image_id} in the index")
            return self._hits(np.array([image_id]), None)[0]

    def ids_for_paths(self, paths: Sequence[str]) -> dict[str, int]:
        """Path (relative to ``root``) -> id, for the paths that are in the index."""
        with self._lock:
            return self._meta.ids_for_paths(list(paths))

    def paths(self) -> list[str]:
        """Every indexed path, relative to ``root``, as table text (open it with :meth:`file_of`)."""
        return list(self.paths_by_id().values())

    def paths_by_id(self) -> dict[int, str]:
        """Every image id -> its path (as :meth:`paths` gives it), ids ascending."""
        with self._lock:
            return dict(self._meta.all_paths())

    @property
    def metadata_path(self) -> Path:
        """The metadata file of the generation this reader holds (what the curation store attaches)."""
        return self._meta.path

    def vector(self, image_id: int) -> np.ndarray:
        """The stored unit vector (approximate for an IVF-PQ index)."""
        with self._lock:
            try:
                return self._cpu.reconstruct(int(image_id))
            except (RuntimeError, OverflowError):  # OverflowError: past FAISS's 64-bit ids
                raise IndexUserError(f"no image with id {image_id} in the index") from None

    def everything(self) -> tuple[np.ndarray, dict[int, dict[str, Any]], np.ndarray]:
        """Every image's id (ascending), metadata row and stored vector (in id order): for a whole-index analysis
        such as ``twist suggest-merges``."""
        with self._lock:
            ids = self._meta.all_ids()
            rows = self._meta.rows(ids.tolist())
            vectors = self._cpu.reconstruct_batch(ids) if len(ids) else np.zeros((0, self.dim), np.float32)
        return ids, rows, vectors

    def cluster_ids(self) -> list[int]:
        """The clusters that have at least one image."""
        with self._lock:
            return self._meta.clusters()

    def records(self, cluster: int | None = None, order_by: str = "confidence", descending: bool = True,
                offset: int = 0, limit: int = 60, min_conf: float = 0.0, max_conf: float = 1.0) -> list[Hit]:
        """One page of images, filtered and sorted in SQL so the app never loads a whole cluster."""
        with self._lock:
            rows = self._meta.records(cluster, order_by, descending, offset, limit, min_conf, max_conf)
        names = self._renamed()
        return [self._hit(row, None, names) for row in rows]

    def cluster_summary(self) -> list[dict[str, Any]]:
        """Size and mean confidence per predicted cluster, with its current name."""
        with self._lock:
            summary = self._meta.cluster_summary()
        names = self._renamed()
        return [{**row, "name": names.get(row["cluster"], row["name"])} for row in summary]

    # ---- search
    def _queries(self, vectors: np.ndarray) -> np.ndarray:
        queries = normalized(vectors)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise IndexUserError(f"query vectors have dimension {queries.shape[-1]}, the index {self.dim}")
        if not np.isfinite(queries).all():
            raise IndexUserError("the vectors hold non-finite values (NaN or inf): the model that made them "
                                 "is probably corrupted")
        return queries

    def search_vectors(self, vectors: np.ndarray, k: int = 10, cluster: int | None = None) -> list[list[Hit]]:
        """The ``k`` most similar images (cosine) to each row of ``vectors``, optionally in one cluster."""
        queries = self._queries(vectors)
        with self._lock:
            k = min(int(k), self.size)
            if k <= 0:
                return [[] for _ in queries]
            if cluster is None:
                sims, ids = self._search.search(queries, k)
            else:
                sims, ids = self._search_cluster(queries, k, cluster)
            return [self._hits(ids[row], sims[row][ids[row] >= 0]) for row in range(len(queries))]

    def _search_cluster(self, queries: np.ndarray, k: int, cluster: int) -> tuple[np.ndarray, np.ndarray]:
        """Search restricted to a cluster; rows that an IVF probe leaves short are redone exactly."""
        members = self._meta.ids_in_cluster(cluster)
        k = min(k, len(members))
        if k == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        params = search_params(self._cpu, faiss.IDSelectorBatch(members), self.nprobe)
        sims, ids = self._cpu.search(queries, k, params=params)
        short = (ids < 0).any(axis=1)
        if short.any():
            member_vectors = self._cpu.reconstruct_batch(members)
            exact = queries[short] @ member_vectors.T
            top = np.argsort(-exact, axis=1, kind="stable")[:, :k]
            sims[short] = np.take_along_axis(exact, top, axis=1)
            ids[short] = members[top]
        return sims, ids

    def search_id(self, image_id: int, k: int = 10, cluster: int | None = None) -> list[Hit]:
        """Neighbours of an image already in the index, without the image itself."""
        hits = self.search_vectors(self.vector(image_id), k + 1, cluster)[0]
        return [h for h in hits if h.id != image_id][:k]

    def search_image(self, model: Any, image: Any, k: int = 10, cluster: int | None = None) -> list[Hit]:
        """Embed ``image`` (path, PIL image or array) with the ONNX model, then search by vector."""
        if getattr(model, "embedding_dim", self.dim) != self.dim:
            raise IndexUserError(f"the model gives {model.embedding_dim}-d embeddings but the index holds "
                                 f"{self.dim}-d vectors; use the model the index was built with")
        if isinstance(image, str | Path):
            image = decode_image(image)
        _, embeddings = model.predict([image])
        return self.search_vectors(embeddings, k, cluster)[0]

    def identities(self, paths: Sequence[str] | None = None) -> dict[str, tuple[int, str | None]]:
        """Path -> (id, fingerprint when indexed) of every image, or of those of ``paths`` that are indexed."""
        with self._lock:
            return self._meta.identities(paths)

    def file_changes(self) -> tuple[list[int], set[str]]:
        """One stat per indexed file: the ids of files that are gone, and the paths of files that still exist but
        changed since they were indexed (another picture, same name)."""
        gone, changed = [], set()
        for path, (image_id, fingerprint) in self.identities().items():
            now = file_fingerprint(self.file_of(path))
            if now is None:
                gone.append(image_id)
            elif fingerprint is not None and now != fingerprint:
                changed.add(path)
        return gone, changed

    def _hold(self, meta: IndexMetadata) -> None:
        """Read ``meta`` from now on (the one read before is closed); it closes with :meth:`close` or, never
        closed, once nothing refers to this reader: the app lets a generation retired by an update go when the
        last request holding it ends.
        """
        if hasattr(self, "_release"):
            self._release()
        self._meta = meta
        self._release = weakref.finalize(self, meta.close)
        self._release.atexit = False  # at exit the OS frees it; a daemon thread may still be reading

    def close(self) -> None:
        self._release()


EXACT_KINDS = ("flat", "ivf")  # kinds whose stored vectors are the unit embeddings themselves


class StoredVectors:
    """The stored unit vectors of ``ids`` as an array indexed by position (rows that :func:`measured_recall` reads)."""

    def __init__(self, index: faiss.Index, ids: np.ndarray) -> None:
        self.index, self.ids = index, ids

    def __getitem__(self, positions: np.ndarray) -> np.ndarray:
        return normalized(self.index.reconstruct_batch(self.ids[positions]))


class IndexWriter(IndexReader):
    """An index that can also change: add and remove images, each change published as a new generation."""

    @classmethod
    def create(cls, index_dir: str | Path, cpu_index: faiss.Index, rows: Sequence[dict[str, Any]],
               info: dict[str, Any], device: str = "auto", ids: Sequence[int] | None = None,
               expected: int | None = None, extra: Callable[[IndexMetadata], None] | None = None) -> IndexWriter:
        """Publish a freshly built index (ids ``0..len(rows)-1`` unless given) as a new generation.

        ``expected`` is the generation a rebuild carried its ids from: it is refused if that one changed.
        ``extra`` adds tables of its own to the metadata in the same generation (the review scores).
        """
        ids = list(range(len(rows))) if ids is None else [int(i) for i in ids]
        next_id = max(int(info.get("next_id", 0)), max(ids, default=-1) + 1)

        def write_meta(path: Path, generation: int) -> None:
            meta = IndexMetadata(path, readonly=False)
            meta.insert(ids, rows)
            if extra:
                extra(meta)
            meta.set_info({"uid": new_uid(), **info, "generation": generation, "next_id": next_id,
                            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            meta.commit()
            meta.close()

        commit_generation(Path(index_dir), cpu_index, write_meta, expected=expected)
        return cls.open(index_dir, device)

    # ---- updates
    def _commit(self, mutate: Callable[[], tuple[Callable[[IndexMetadata], None], Step | None]]) -> None:
        """Apply ``mutate`` to the in-memory FAISS index, then publish it with the metadata change and the FAISS
        step it returns (the step is what the generation stores beside the previous base).

        On any failure the object reloads the last committed generation, so memory matches disk again.
        """
        with self._lock:
            try:
                change, step = mutate()

                def write_meta(path: Path, generation: int) -> None:
                    meta = self._meta.copy_to(path)
                    change(meta)
                    meta.set_info({"generation": generation, "next_id": self._info["next_id"]})
                    meta.commit()
                    meta.close()

                folder = commit_generation(self.index_dir, self._cpu, write_meta, expected=self.generation,
                                           step=step)
            except BaseException:
                self._reload()
                raise
            self._hold(IndexMetadata(folder / META_FILE))
            self._info = self._meta.info()
            self.generation = self._info["generation"]
            self._search = to_device(self._cpu, self.device)

    def rebuild_as(self, plan: IndexPlan, seed: int = 0) -> None:
        """Write the index again as ``plan`` from its stored vectors, as one whole new generation (ids, metadata and
        review scores unchanged): an index grown by updates past its kind's range gets what a build would choose.

        Only for kinds that store vectors exactly (flat, IVF); recall@10 is measured again against exact search
        over those vectors.
        """
        if self.kind not in EXACT_KINDS:
            raise IndexUserError(f"a {self.kind} index keeps approximate vectors; rebuild it from its labels table")

        def mutate() -> tuple[Callable[[IndexMetadata], None], None]:
            ids = self._meta.all_ids()
            stored = StoredVectors(self._cpu, ids)
            size = training_size(plan, len(ids))
            picked = np.sort(np.random.default_rng(seed).choice(len(ids), size, replace=False))

            def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
                for start in range(0, len(ids), CHUNK):
                    yield ids[start:start + CHUNK], stored[np.arange(start, min(len(ids), start + CHUNK))]

            rebuilt = build(plan, self.dim, len(ids), chunks, stored[picked] if plan.nlist else None)
            recall, count = measured_recall(rebuilt, stored, np.arange(len(ids)), ids, seed=seed)
            self._cpu = rebuilt
            layout = {"kind": plan.kind, "nlist": plan.nlist, "nprobe": plan.nprobe, "pq_m": plan.pq_m,
                      "pca_dim": plan.pca_dim, "recall_at_10": recall, "recall_queries": count}
            return (lambda meta: meta.set_info(layout)), None

        self._commit(mutate)  # no step: the generation holds the whole index

    def _reload(self) -> None:
        fresh = IndexWriter.open(self.index_dir, self.device, self.names)
        fresh._release.detach()  # its meta is ours now
        self.__dict__.update({k: v for k, v in fresh.__dict__.items() if k not in ("_lock", "_release", "_meta")})
        self._hold(fresh._meta)

    def add(self, rows: Sequence[str | dict[str, Any]], embeddings: np.ndarray) -> np.ndarray:
        """Add images (relative paths, or label rows with ``path``, ``cluster``, ...) with their embeddings.

        A path already in the index is replaced (new vector, new id). Returns the new ids.
        """
        records = [{"path": r} if isinstance(r, str) else dict(r) for r in rows]
        for record in records:
            record.setdefault("fingerprint", file_fingerprint(self.file_of(record["path"])))
        vectors = self._queries(embeddings)
        paths = [r["path"] for r in records]
        if len(vectors) != len(records):
            raise IndexUserError(f"{len(records)} images but {len(vectors)} embeddings")
        if len(set(paths)) != len(paths):
            raise IndexUserError("the same path is given twice in one add")
        new_ids = np.arange(self._info["next_id"], self._info["next_id"] + len(records), dtype=np.int64)

        def mutate() -> tuple[Callable[[IndexMetadata], None], Step]:
            replaced = np.array(list(self._meta.ids_for_paths(paths).values()), dtype=np.int64)
            step = Step.encode(self._cpu, replaced, new_ids, vectors)
            step.apply(self._cpu)
            self._info["next_id"] += len(records)

            def change(meta: IndexMetadata) -> None:
                meta.delete(replaced)
                meta.insert(new_ids, records)
            return change, step

        self._commit(mutate)
        return new_ids

    def remove(self, items: Iterable[int | str]) -> int:
        """Remove images given by id or relative path; unknown ones are ignored. Returns how many went."""
        items = list(items)
        by_path = self._meta.ids_for_paths([i for i in items if isinstance(i, str)])
        wanted = [int(i) for i in items if not isinstance(i, str)] + list(by_path.values())
        ids = np.array(sorted(set(self._meta.rows(wanted))), dtype=np.int64)
        if len(ids):
            def mutate() -> tuple[Callable[[IndexMetadata], None], Step]:
                step = Step.encode(self._cpu, ids)
                step.apply(self._cpu)
                return lambda meta: meta.delete(ids), step

            self._commit(mutate)
        return len(ids)

    def remove_missing(self) -> int:
        """Drop entries whose files no longer exist under ``root``."""
        return self.remove(self.file_changes()[0])

    def update(self, rows: Sequence[dict[str, Any]], embeddings: np.ndarray,
               gone: Iterable[int]) -> tuple[np.ndarray, int]:
        """Add label rows with their embeddings (a path already indexed is replaced) and remove the ids ``gone``,
        as one generation whose review scores are refreshed for what changed only (:func:`review_table.rescore`).
        Returns (new ids, images removed)."""
        records = [dict(r) for r in rows]
        for record in records:
            record.setdefault("fingerprint", file_fingerprint(self.file_of(record["path"])))
        vectors = self._queries(embeddings) if len(records) else np.zeros((0, self.dim), np.float32)
        new_ids = np.arange(self._info["next_id"], self._info["next_id"] + len(records), dtype=np.int64)
        removed = [0]

        def mutate() -> tuple[Callable[[IndexMetadata], None], Step]:
            replaced = self._meta.ids_for_paths([r["path"] for r in records]).values()
            dropped = np.array(sorted(set(self._meta.rows([*gone, *replaced]))), dtype=np.int64)
            scored = review_table.meta_has_scores(self._meta)
            lost = review_table.near_removed(self._cpu, dropped, self._meta) if scored else set()
            step = Step.encode(self._cpu, dropped, new_ids, vectors)
            step.apply(self._cpu)
            self._info["next_id"] += len(records)
            changes = review_table.search_new(self._cpu, vectors, new_ids, lost) if scored else None
            removed[0] = len(dropped) - len(replaced)

            def change(meta: IndexMetadata) -> None:
                gone_rows = meta.rows(dropped.tolist()) if changes is not None else {}
                meta.delete(dropped)
                meta.insert(new_ids, records)
                if changes is not None:
                    review_table.rescore(meta, self._cpu, changes, gone_rows)
            return change, step

        self._commit(mutate)
        return new_ids, removed[0]




AUTO_THRESHOLD_RULE = ("an outlier among the nearest-neighbour distances 1 - cosine: at most the median distance times "
                       "min(1/2, exp(-3 x 1.4826 x MAD of their logarithms))")


def nearest_similarities(index: IndexReader, batch: int = 4096) -> np.ndarray:
    """Each image's cosine to its nearest other image (one FAISS k=3 search per batch, the image itself dropped)."""
    with index._lock:
        ids = index._meta.all_ids()
        k = min(3, len(ids))
        nearest = np.full(len(ids), np.nan)
        if k < 2:  # no image has another to be near
            return nearest
        for start in range(0, len(ids), batch):
            chunk = ids[start:start + batch]
            sims, found = index._search.search(index._cpu.reconstruct_batch(chunk), k)
            other = (found != chunk[:, None]) & (found >= 0)
            first = np.argmax(other, axis=1)  # sorted by similarity: the first hit that is another image
            rows = np.arange(len(chunk))
            nearest[start:start + len(chunk)] = np.where(other[rows, first], sims[rows, first], np.nan)
    return nearest


def auto_threshold(nearest: np.ndarray, spread: float = 3.0) -> tuple[float, dict[str, Any]]:
    """A cosine threshold that means "far closer than images here usually are to their nearest neighbour".

    A fixed cosine means nothing across embeddings (0.95 marked a fifth of a photo set), so the rule is relative:
    a pair counts when its distance 1 - cosine is an outlier on the log scale among the nearest-neighbour
    distances (median - ``spread`` robust SDs, MAD x 1.4826), and at least twice as close as the median. Logs make
    it scale-free; median and MAD ignore the duplicates themselves while they are under half the images.
    """
    known = nearest[np.isfinite(nearest)]
    if len(known) == 0:
        return 1.0, {"images_measured": 0}
    distances = np.maximum(1.0 - known.astype(np.float64), 1e-6)  # float error puts exact copies a hair off 0
    logs = np.log(distances)
    median_log = float(np.median(logs))
    robust_sd = 1.4826 * float(np.median(np.abs(logs - median_log)))
    cut = float(np.exp(median_log - max(spread * robust_sd, np.log(2.0))))
    stats = {"images_measured": len(known),
             "nearest_similarity_median": round(float(np.median(known)), 6),
             "nearest_similarity_p05": round(float(np.quantile(known, 0.05)), 6),
             "nearest_similarity_p95": round(float(np.quantile(known, 0.95)), 6),
             "nearest_distance_median": round(float(np.exp(median_log)), 8),
             "log_distance_robust_sd": round(robust_sd, 6), "spread": spread}
    return round(1.0 - cut, 8), stats


def find_duplicates(index: IndexReader, threshold: float = 0.95, batch: int = 4096) -> list[list[Hit]]:
    """Groups of images linked by cosine >= ``threshold`` (range search, then connected components).

    Largest groups first; each hit's similarity is its closest link inside the group.
    """
    with index._lock:
        ids = index._meta.all_ids()
        rows: list[np.ndarray] = []
        cols: list[np.ndarray] = []
        sims: list[np.ndarray] = []
        for start in range(0, len(ids), batch):
            chunk = ids[start:start + batch]
            vectors = index._cpu.reconstruct_batch(chunk)
            lims, found_sims, found = index._cpu.range_search(vectors, threshold)
            query_pos = np.repeat(np.arange(start, start + len(chunk)), np.diff(lims).astype(np.int64))
            other = found != chunk[query_pos - start]
            rows.append(query_pos[other])
            cols.append(np.searchsorted(ids, found[other]))
            sims.append(found_sims[other])
    row, col, sim = (np.concatenate(a) if a else np.zeros(0) for a in (rows, cols, sims))
    graph = coo_matrix((np.ones(len(row)), (row.astype(np.int64), col.astype(np.int64))), shape=(len(ids), len(ids)))
    _, labels = connected_components(graph, directed=False)
    best = np.full(len(ids), -1.0)
    np.maximum.at(best, row.astype(np.int64), sim)
    np.maximum.at(best, col.astype(np.int64), sim)
    groups = [np.flatnonzero(labels == label) for label in np.unique(labels[best >= 0])]
    result = [sorted(index._hits(ids[g], best[g]), key=lambda h: -h.similarity) for g in groups]  # type: ignore[operator]
    return sorted(result, key=lambda group: (-len(group), group[0].path))


def embed_rows(index: IndexReader, model: Any, paths: Sequence[str],
               batch_size: int = 64) -> tuple[list[dict[str, Any]], np.ndarray, list[str]]:
    """Label images (table text paths relative to the index root): (rows, embeddings, why files were skipped)."""
    images, kept, problems = [], [], []
    for path in paths:
        try:
            images.append(decode_image(index.file_of(path)))
            kept.append(path)
        except (ImageReadError, OSError) as error:
            problems.append(f"{path}: {error}")
    if not kept:
        return [], np.zeros((0, index.dim), np.float32), problems
    probs, embeddings = model.predict(images, batch_size=batch_size)
    return label_rows(kept, probs, list(model.class_names)), embeddings, problems
