"""What the measures read, one row per image: an index (with the app's curation applied) or a labels table."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from twist_core.curate.merges.options import MergeUserError
from twist_core.curate.store_file import curation_path
from twist_core.index.image_index import IndexReader
from twist_core.layout import CONFIG_FILE, CURATION_FILE, MANIFEST


@dataclass(frozen=True)
class ClusterData:
    """What the measures need, one row per image: its current cluster, unit embedding and top clusters."""

    ids: np.ndarray  # (n,) index id of each image (its row number for a labels table)
    labels: np.ndarray  # (n,) current cluster of each image
    vectors: np.ndarray  # (n, d) unit embeddings
    topk_clusters: np.ndarray  # (n, t) most probable clusters (mapped through merges), -1 where absent
    topk_probs: np.ndarray  # (n, t)
    names: dict[int, str]
    merged_into: dict[int, int] = field(default_factory=dict)  # the model's clusters curation merged away


def cluster_data(ids: np.ndarray, labels: np.ndarray, vectors: np.ndarray, topk: Sequence[str | None],
                 names: Mapping[int, str], merged_into: Mapping[int, int] | None = None) -> ClusterData:
    """Rows of current labels, embeddings and top-k JSON (``[[cluster, prob], ...]``); ``merged_into`` maps
    the model's clusters to where curation merged them."""
    width = max((len(json.loads(t)) for t in topk if t), default=1)
    clusters, probs = _parse_topk(topk, width)
    if merged_into:
        lookup = np.arange(max(int(clusters.max(initial=0)), max(merged_into)) + 1)
        for source, into in merged_into.items():
            lookup[source] = into
        clusters = np.where(clusters >= 0, lookup[np.clip(clusters, 0, None)], -1)
    return ClusterData(np.asarray(ids, np.int64), np.asarray(labels, np.int64), _unit(vectors), clusters, probs,
                       dict(names), dict(merged_into or {}))


def _parse_topk(texts: Sequence[str | None], width: int) -> tuple[np.ndarray, np.ndarray]:
    clusters = np.full((len(texts), width), -1, np.int64)
    probs = np.zeros((len(texts), width))
    for row, text in enumerate(texts):
        for col, (cluster, prob) in enumerate(json.loads(text)[:width] if text else []):
            clusters[row, col], probs[row, col] = int(cluster), float(prob)
    return clusters, probs


def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


def data_from_index(index_dir: Path, state_dir: Path | None = None, store: Any = None) -> ClusterData:
    """Embeddings and top-k of an index; with the app's curation (its state folder, or its open ``store``) the
    curated labels, excluded images left out."""
    index = IndexReader.open(index_dir, "cpu")
    try:
        names = {int(c["cluster"]): c["name"] or f"cluster {c['cluster']}" for c in index.cluster_summary()
                 if c["cluster"] is not None}
        ids, rows, vectors = index.everything()
        metadata = index.metadata_path
    finally:
        index.close()
    labels = {int(i): rows[int(i)]["cluster"] for i in ids}
    merged: dict[int, int] = {}
    if store is not None:
        labels, names, merged = curated_labels(store)
    elif state_dir is not None:
        labels, names, merged = labels_from_state(index_dir, state_dir, metadata, names)
    keep = np.array([labels.get(int(i)) is not None and labels[int(i)] >= 0 for i in ids], dtype=bool)
    kept = ids[keep]
    return cluster_data(kept, np.array([labels[int(i)] for i in kept], np.int64), vectors[keep],
                        [rows[int(i)]["topk"] for i in kept], names, merged)


def curated_labels(store: Any) -> tuple[dict[int, int | None], dict[int, str], dict[int, int]]:
    """From the app's curation store: the label of every image id, the cluster names, where each cluster went."""
    labels = {r.id: r.label for r in store.iter_records()}
    merged = {c: store.merged_into(c) for c in range(store.n_clusters)}
    return labels, store.names(), {c: t for c, t in merged.items() if c != t}


def labels_from_state(index_dir: Path, state_dir: Path, metadata: Path, names: dict[int, str]
                      ) -> tuple[dict[int, int | None], dict[int, str], dict[int, int]]:
    """:func:`curated_labels` of the curation store in the app's state folder."""
    from twist_core.curate.curation import CurationError, CurationStore

    if not curation_path(index_dir, state_dir).is_file():
        raise MergeUserError(f"no {CURATION_FILE} in {state_dir}: give the folder the app was started with "
                             "(--state-dir), or leave the option out")
    default = [names.get(c, f"cluster {c}") for c in range(max(names, default=-1) + 1)]
    try:
        store = CurationStore.for_index(index_dir, state_dir, default, metadata)
    except CurationError as error:
        raise MergeUserError(str(error)) from None
    try:
        return curated_labels(store)
    finally:
        store.close()


def data_from_table(table: Path) -> ClusterData:
    """Labels, embeddings and top-k of a ``twist label`` table (rows that failed to label left out)."""
    from twist_core.label.table import load_labels

    rows, embeddings, _ = load_labels(table)
    names = {int(r["cluster"]): r["cluster_name"] or f"cluster {r['cluster']}" for r in rows}
    return cluster_data(np.arange(len(rows)), np.array([r["cluster"] for r in rows], np.int64), np.asarray(embeddings),
                        [r["topk"] for r in rows], names)


def load_source(source: str | None, state_dir: str | None) -> ClusterData:
    """The clusters to suggest over, from an index folder or a labels table; anything else is refused."""
    if not source:
        raise MergeUserError("give the INDEX folder (or a labels table of twist label)")
    path = Path(source)
    if not path.exists():
        raise MergeUserError(f"{source} not found")
    if path.is_dir() and (path / MANIFEST).is_file():
        return data_from_index(path, Path(state_dir) if state_dir else None)
    if state_dir:
        raise MergeUserError("--state-dir applies to an index folder only")
    if path.is_file() and path.suffix.lower() in (".csv", ".jsonl", ".parquet"):
        return data_from_table(path)
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        raise MergeUserError(f"{source} is a training run, which holds no embeddings of your images: run twist "
                             f"export {source} --out M.onnx; twist label M.onnx FOLDER --out L.csv; twist index "
                             "L.csv --out INDEX, then give INDEX")
    raise MergeUserError(f"{source} is neither an index folder (twist index) nor a labels table (twist label)")


def source_images(source: str | Path) -> tuple[Path, str | None, str | None, dict[int, str]]:
    """The image folder, the model file and its SHA-256 that an index (or labels table) was made with, and the
    path of each of its image ids (a table's ids are its usable rows, as :func:`data_from_table` numbers them)."""
    path = Path(source)
    if path.is_dir():
        index = IndexReader.open(path, "cpu")
        try:
            info, paths = index.info, index.paths_by_id()
        finally:
            index.close()
    else:
        from twist_core.label.table import load_labels

        rows, _, info = load_labels(path)
        paths = {i: row["path"] for i, row in enumerate(rows)}
    return Path(info["root"]), info.get("model"), info.get("model_sha256"), paths
