"""``twist index LABELS_OR_FOLDER --out INDEX``: build (or update) an image index from ``twist label`` output.

A labels table brings its row-aligned embeddings (``T.embeddings.npy``) and the folder root (``T.meta.json``);
a folder is labelled first with ``--model``. Rows that failed to label are skipped. The table is streamed
(rows and vectors read chunk by chunk), so memory is the index plus a chunk: at 1M images the compressed kind
(``pcasq``, see :mod:`twist_core.vectors`) holds 256 B per image. Recall@10 against exact search is measured
on 200 sampled images, printed and kept in the index's info with the CPU seconds per stage.

A rebuild over an existing index keeps the id of every unchanged file (path, size and modification time;
one ``stat`` per file), so the app's curation and thumbnails, keyed by id, stay on their images. Embeddings
holding NaN/inf or of another dimension than the model's are refused, and a full disk is one sentence:
nothing is published unless everything was written (exit code 2 for every refusal).

The index records the fingerprint (SHA-256) of the model its labels came from. ``--update`` with another model
(``twist finetune`` then ``twist export``, or a re-export over the same file) labels and embeds every image
again into one new generation of the same index (ids and lineage kept, crash-safe like any update), since
mixing two models' clusters in one index would mean nothing; the app then sets aside curation made for the
old model's clusters.
"""

from __future__ import annotations

import dataclasses
import shutil
import sqlite3
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from twist_core.config import AutoConfig, auto_option, option
from twist_core.data.folder import scan_folder
from twist_core.index import review_table
from twist_core.index.image_index import EXACT_KINDS, IndexWriter, embed_rows
from twist_core.index.metadata import (
    IndexMetadata,
    IndexUserError,
    commit_generation,
    file_fingerprint,
    model_history,
    new_uid,
    read_manifest,
)
from twist_core.index.metadata import meta_path as index_meta_path
from twist_core.index.progress import Stages
from twist_core.index.recall import recall_at_10
from twist_core.index.stream import new_rows, open_table, scan_table, usable_chunks, vector_chunks, vectors_at
from twist_core.io_utils import file_sha256, mark_output_folder, path_to_text
from twist_core.label.table import labels_paths, read_labels_meta, skipped_path
from twist_core.layout import FOLDER_LABELS_FILE, MANIFEST, META_FILE
from twist_core.vectors import (
    KINDS,
    build,
    plan_index,
    resolve_device,
    training_size,
)


@dataclass
class IndexConfig(AutoConfig):
    source: str | None = option(None, "labels table of twist label (.csv/.jsonl/.parquet) or image folder")
    model: str | None = option(None, "ONNX model: labels a folder source, embeds new images; search default")
    out: str = option("index", "index folder (a new build replaces what is there atomically)")
    kind: str = option("auto", "index type: auto = flat (exact) up to 50k images, IVF above, pcasq (128-d "
                       "projection + IVF with 16-bit codes) from 500k; an auto index that updates take past "
                       "its type's range is written again as the type its size calls for", choices=list(KINDS))
    nlist: int | str = auto_option(0, "IVF coarse lists; auto: about 2 sqrt(N)")
    nprobe: int | str = auto_option(0, "IVF lists searched per query (speed/recall trade-off); auto: max(16, "
                                       "nlist/128)")
    pq_m: int | str = auto_option(0, "IVF-PQ bytes per vector (sub-quantizers, divides the dimension); auto: dim/8")
    device: str = option("auto", "where FAISS trains and searches", choices=["auto", "cpu", "cuda"])
    update: bool = option(False, "update the index at --out instead of rebuilding: with a table, add its rows "
                                 "not yet indexed and those whose file changed since (a stat per indexed row of "
                                 "the table; nothing is removed); with no source, label new or changed files "
                                 "under its root and drop deleted ones (a stat per file)")
    seed: int = option(0, "seed of the k-means training sample")


def require_model_dim(dim: int, config: IndexConfig, meta: dict[str, Any]) -> None:
    """The embeddings must come from the model the index is for (``--model``, else the one that labelled)."""
    expected, source = meta.get("embedding_dim"), "the labelling model"
    if config.model:
        from twist_core.deploy.infer import OnnxModel

        expected, source = OnnxModel(config.model, device="cpu", threads=1).embedding_dim, str(config.model)
    if expected is not None and int(expected) != dim:
        raise IndexUserError(f"the embeddings have dimension {dim} but {source} gives {expected}-d embeddings; "
                             "label the folder again with that model")


@dataclass(frozen=True)
class Lineage:
    """What a rebuild carries over from the index it replaces, so curation and thumbnails keep their images."""

    identities: dict[str, tuple[int, str | None]]
    info: dict[str, Any]
    generation: int | None


def previous_lineage(out: Path) -> Lineage:
    """Ids, uid and next free id of the index already at ``out`` (nothing when there is none)."""
    if not (out / MANIFEST).is_file():
        return Lineage({}, {}, None)
    try:
        manifest = read_manifest(out)
        meta = IndexMetadata(out / manifest["dir"] / META_FILE)
        try:
            identities, info = meta.identities(), meta.info()
        finally:
            meta.close()
    except (ValueError, KeyError, OSError, sqlite3.Error) as error:
        raise IndexUserError(f"the index already in {out} cannot be read ({error}), so its ids cannot be kept "
                             "for its curation; move it away or choose another --out") from None
    kept = ("uid", "next_id", "root", "model_sha256", "model_history")
    return Lineage(identities, {k: info[k] for k in kept if k in info}, manifest["generation"])


class IdAssigner:
    """An unchanged file (same path and fingerprint) keeps its id; anything else gets a never-used one.

    Entries of an index that predates fingerprints match by path, but only in the same folder. Called on
    chunks of rows (with their ``fingerprint`` set), in table order.
    """

    def __init__(self, root: Path, lineage: Lineage) -> None:
        self.lineage = lineage
        self.next_id = max([int(lineage.info.get("next_id", 0)), *(i + 1 for i, _ in lineage.identities.values())])
        self.unknown_matches = lineage.info.get("root") == str(root.resolve())

    def __call__(self, rows: list[dict[str, Any]]) -> np.ndarray:
        ids = np.empty(len(rows), dtype=np.int64)
        for position, row in enumerate(rows):
            old = self.lineage.identities.get(row["path"])
            if old is not None and row["fingerprint"] is not None and (
                    old[1] == row["fingerprint"] or (old[1] is None and self.unknown_matches)):
                ids[position] = old[0]
            else:
                ids[position] = self.next_id
                self.next_id += 1
        return ids


def _label_folder(folder: Path, config: IndexConfig) -> Path:
    if not config.model:
        raise IndexUserError("indexing a folder needs --model to compute its embeddings")
    from twist_core.label.labeller import LabelConfig, label_folder

    table = Path(config.out) / FOLDER_LABELS_FILE
    mark_output_folder(config.out)  # an index inside the folder it labels is never taken for images
    label_folder(LabelConfig(model=config.model, folder=str(folder), out=str(table)))
    return table


def build_index(config: IndexConfig) -> Path:
    """Build the index described by ``config`` and publish it in ``config.out``; returns that folder.

    Over an existing index, unchanged files keep their ids (see :class:`IdAssigner`). The table is streamed:
    memory holds the index, a chunk of vectors and a few arrays per image, never a row dict per image.
    """
    out = Path(config.out)
    stages = Stages()
    stages.start("read table")
    lineage = previous_lineage(out)
    source = Path(config.source)
    table = _label_folder(source, config) if source.is_dir() else source
    _, labels_meta = open_table(table)
    scan = scan_table(table, IdAssigner(Path(labels_meta["root"]), lineage))
    lineage = dataclasses.replace(lineage, identities={})  # 1M paths: not needed past the scan
    n, dim = len(scan.positions), scan.embeddings.shape[1]
    require_model_dim(dim, config, scan.meta)
    plan = plan_index(n, dim, config.kind, config.nlist, config.nprobe, config.pq_m)
    device = resolve_device(config.device)
    stages.start("train")
    sample = None
    if plan.nlist:
        size = training_size(plan, n)
        sample = vectors_at(scan.embeddings, np.sort(np.random.default_rng(config.seed).choice(n, size, replace=False)))

    def chunks():
        stages.start("add")
        yield from stages.counted(vector_chunks(scan), n, lambda chunk: len(chunk[0]))

    index = build(plan, dim, n, chunks, sample, device)
    del sample
    stages.start("recall")
    recall, queries = recall_at_10(index, scan)  # printed in the summary (a line here doubled every error's output)
    stages.start("review score")
    scores, stats = review_table.score_scan(index, scan, stages)
    stages.start("write")
    model = config.model or scan.meta.get("model")
    sha = scan.meta.get("model_sha256") or model_sha256(model)
    info = {**lineage.info, "root": str(Path(scan.meta["root"]).resolve()),  # uid and next id carried over
            "model": str(Path(model).resolve()) if model else None, "model_sha256": sha,
            "model_history": model_history(lineage.info, sha, time.time()),
            "dim": dim, "kind": plan.kind, "metric": "cosine", "nlist": plan.nlist, "nprobe": plan.nprobe,
            "pq_m": plan.pq_m, "pca_dim": plan.pca_dim, "recall_at_10": recall, "recall_queries": queries,
            "kind_asked": config.kind,
            "source": str(table.resolve()), "uid": lineage.info.get("uid") or new_uid(),
            "next_id": max(int(lineage.info.get("next_id", 0)), int(scan.ids.max()) + 1)}

    def write_meta(path: Path, generation: int) -> None:
        meta = IndexMetadata(path, readonly=False)
        start = 0
        for _, rows in usable_chunks(table):
            for row, fingerprint in zip(rows, scan.fingerprints[start:start + len(rows)], strict=True):
                row["fingerprint"] = fingerprint
            meta.insert(scan.ids[start:start + len(rows)].tolist(), rows)
            start += len(rows)
        review_table.write_table(meta, scores, review_table.DEFAULT_SETTINGS, stats)
        meta.set_info({**info, "generation": generation, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       "build_cpu_s": stages.finish()})
        meta.commit()
        meta.close()

    commit_generation(out, index, write_meta, expected=lineage.generation)
    return out


def model_sha256(model: str | Path | None) -> str | None:
    """The fingerprint of a model file (None when there is none to read)."""
    return file_sha256(model) if model and Path(model).is_file() else None


@dataclass(frozen=True)
class ModelChange:
    """The model an update would label with, against the one the index's labels came from."""

    path: str | None
    sha256: str | None
    recorded: str | None

    @property
    def changed(self) -> bool:
        return self.sha256 is not None and self.recorded is not None and self.sha256 != self.recorded


def model_change(config: IndexConfig) -> ModelChange:
    """Compare the update's model (the table's, else --model, else the index's) with the index's record.

    An index built before fingerprints were recorded counts as changed only when another model file is given.
    """
    meta = IndexMetadata(index_meta_path(Path(config.out)))
    try:
        info = meta.info()
    finally:
        meta.close()
    if config.source:
        meta = read_labels_meta(Path(config.source))
        path, sha = meta.get("model"), meta.get("model_sha256")
    else:
        path = config.model or info.get("model")
        sha = model_sha256(path)
    recorded = info.get("model_sha256")
    if recorded is None and sha is not None and path and info.get("model") \
            and Path(path).resolve() != Path(info["model"]).resolve():
        recorded = "unknown"
    return ModelChange(path, sha, recorded)


def index_contents(out: Path) -> tuple[dict[str, Any], set[str]]:
    """The info and indexed paths of the generation in ``out``, from its metadata alone (no vectors loaded)."""
    meta = IndexMetadata(index_meta_path(out))
    try:
        return meta.info(), {path for _, path in meta.all_paths()}
    finally:
        meta.close()


@dataclass(frozen=True)
class UpdateResult:
    """What an update did: images added and removed, or (``relabelled``) every image labelled again."""

    added: int
    removed: int
    relabelled: int | None = None
    change: ModelChange | None = None


def relabel_index(config: IndexConfig, change: ModelChange) -> UpdateResult:
    """Label and embed every image again with the new model, as one new generation of the same index.

    A folder is labelled into ``OUT/labels-<sha>.csv`` (resumed if an earlier try was killed); the rebuild keeps
    every unchanged file's id and the index's uid, and publishes only when complete.
    """
    out = Path(config.out)
    info, old_paths = index_contents(out)
    print(f"{out}: the model differs from the one its labels came from ({str(change.recorded)[:12]} -> "
          f"{str(change.sha256)[:12]}): labelling and embedding every image again", file=sys.stderr)
    source = Path(config.source) if config.source else _relabel_folder(out, Path(info["root"]), change)
    settings = dataclasses.replace(config, source=str(source), update=False,
                                   model=config.model if config.source else change.path,
                                   kind=info.get("kind_asked", info["kind"]) if config.kind == "auto" else config.kind)
    build_index(settings)
    drop_old_relabellings(out, source)
    _, new_paths = index_contents(out)
    return UpdateResult(len(new_paths - old_paths), len(old_paths - new_paths), len(new_paths), change)


def drop_old_relabellings(out: Path, current: Path) -> None:
    """Tables (and unfinished work) of earlier relabellings in the index folder: the index no longer reads them."""
    for stale in out.glob("labels-*.csv"):
        if stale != current:
            for path in (stale, *labels_paths(stale), skipped_path(stale)):
                path.unlink(missing_ok=True)
    for parts in out.glob("labels-*.csv.parts"):
        if parts.name != current.name + ".parts":
            shutil.rmtree(parts, ignore_errors=True)


def _relabel_folder(out: Path, root: Path, change: ModelChange) -> Path:
    from twist_core.label.labeller import LabelConfig, label_folder

    if not change.path:
        raise IndexUserError("no model recorded in the index; give --model to label the images")
    table = out / f"labels-{str(change.sha256)[:12]}.csv"
    label_folder(LabelConfig(model=str(change.path), folder=str(root), out=str(table), overwrite=table.exists()))
    return table


def update_index(config: IndexConfig) -> UpdateResult:
    """Drop entries whose files are gone, then add what is new or changed; with another model, relabel all.

    The table is checked (dimension, finite values) before anything is written.
    """
    change = model_change(config)
    if change.changed:
        return relabel_index(config, change)
    added, removed = _add_and_remove(config)
    return UpdateResult(added, removed)


def _add_and_remove(config: IndexConfig) -> tuple[int, int]:
    """The update of an index whose model is unchanged, published as one generation; returns (added, removed).

    A table source adds its rows not yet in the index and removes nothing (no file is looked at but the new
    ones); a folder source drops the files that are gone and embeds the new or changed ones (a stat per file).
    """
    index = IndexWriter.open(config.out, config.device)
    try:
        if config.source:
            rows, vectors = _new_table_rows(index, Path(config.source))
            gone: list[int] = []
        else:
            rows, vectors, gone = _folder_changes(index, config)
        added, removed = index.update(rows, vectors, gone) if len(rows) or gone else (np.zeros(0), 0)
        follow_size(index, config)
    finally:
        index.close()
    if not review_table.index_has_scores(config.out):
        review_table.refresh_index(config.out)  # an index from before the table: score every image once
    return len(added), removed


def follow_size(index: IndexWriter, config: IndexConfig) -> None:
    """An index that updates took past its kind's range (flat past 50k images, IVF past 500k or with lists grown 4x
    too long, IVF back under 50k) is written again as a build would choose it, from its stored vectors. Not when a
    kind was asked for, nor for the compressed kind (its vectors are approximate: rebuild from the table)."""
    if config.kind != "auto" or index.info.get("kind_asked", "auto") != "auto" or index.kind not in EXACT_KINDS:
        return
    wanted = plan_index(index.size, index.dim)
    grown = wanted.kind == index.kind == "ivf" and wanted.nlist > 2 * int(index.info.get("nlist") or 0)
    if wanted.kind == index.kind and not grown:
        return
    print(f"{config.out}: {index.size} images now, past what its {index.kind} index was planned for: writing it "
          f"again as {wanted.kind}" + (f" with {wanted.nlist} lists" if wanted.nlist else ""), file=sys.stderr)
    index.rebuild_as(wanted, config.seed)


def _new_table_rows(index: IndexWriter, table: Path) -> tuple[list[dict[str, Any]], np.ndarray]:
    """The labelled rows of ``table`` that the index does not hold as they are, with vectors: paths it lacks, and
    indexed paths whose file changed since (a stat per such row: a table of only the new rows stats only those)."""
    embeddings, _ = open_table(table)
    if embeddings.shape[1] != index.dim:
        raise IndexUserError(f"the embeddings have dimension {embeddings.shape[1]} but the index holds "
                             f"{index.dim}-d vectors; label with the model the index was built with")
    found, vectors = [], []
    every = index.identities() if len(embeddings) > 50_000 else None  # one query beats thousands of IN lists

    def unchanged(paths: list[str]) -> set[str]:
        held = every if every is not None else index.identities(paths)
        return {path for path in paths if path in held
                and held[path][1] in (None, file_fingerprint(index.file_of(path)))}

    for positions, rows in new_rows(table, unchanged):
        present = [i for i, row in enumerate(rows) if index.file_of(row["path"]).is_file()]
        if present:
            found += [rows[i] for i in present]
            vectors.append(vectors_at(embeddings, positions[present]))
    repeated = [path for path, times in Counter(row["path"] for row in found).items() if times > 1]
    if repeated:
        raise IndexUserError(f"{table}: {repeated[0]} is in two rows; a table lists each image once (label the "
                             "folder again, or drop the repeated row)")
    return found, np.concatenate(vectors) if vectors else np.zeros((0, index.dim), np.float32)


def _folder_changes(index: IndexWriter, config: IndexConfig) -> tuple[list[dict[str, Any]], np.ndarray, list[int]]:
    """New and changed files under the index's root, labelled and embedded, and the ids of files that are gone."""
    model_path = config.model or index.info.get("model")
    if not model_path:
        raise IndexUserError("no model recorded in the index; give --model to embed the new images")
    from twist_core.deploy.infer import OnnxModel

    model = OnnxModel(model_path, device=config.device)
    gone, changed = index.file_changes()
    known = set(index.paths()) - changed
    scanned = (path_to_text(path) for path in scan_folder(index.root))  # table text, as the index holds names
    new_paths = [path for path in scanned if path not in known]
    rows, vectors, problems = embed_rows(index, model, new_paths)
    for problem in problems:
        print(f"skipped {problem}", file=sys.stderr)
    return rows, vectors, gone
