"""Recall@10 of an index against exact search in the original space, measured at build time on a sample of
queries: the exact answer is a chunked matrix product over the embeddings file, so a compressed
layout (projection, quantisation, IVF probing) states what it costs in found neighbours."""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np

from twist_core.index.stream import TableScan, vectors_at

QUERIES = 200
K = 10
EXACT_CHUNK = 65_536


def exact_top(embeddings: np.ndarray, positions: np.ndarray, ids: np.ndarray, queries: np.ndarray,
              k: int = K) -> np.ndarray:
    """Exact top-``k`` ids (cosine) of unit ``queries`` over the rows ``positions`` (ids ``ids``), chunk by chunk."""
    best_sims = np.full((len(queries), k), -np.inf, np.float32)
    best = np.full((len(queries), k), -1, np.int64)
    for start in range(0, len(positions), EXACT_CHUNK):
        part = slice(start, start + EXACT_CHUNK)
        sims = np.hstack([best_sims, queries @ vectors_at(embeddings, positions[part]).T])
        ids_here = np.broadcast_to(ids[part], (len(queries), sims.shape[1] - k))
        ids_all = np.hstack([best, ids_here])
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        best_sims, best = np.take_along_axis(sims, top, axis=1), np.take_along_axis(ids_all, top, axis=1)
    return best


def recall_at_10(index: faiss.Index, scan: TableScan, queries: int = QUERIES, seed: int = 0) -> tuple[float, int]:
    """(recall@10, queries used) of a fresh build, against its table's embeddings."""
    return measured_recall(index, scan.embeddings, scan.positions, scan.ids, queries, seed)


def measured_recall(index: faiss.Index, embeddings: Any, positions: np.ndarray, ids: np.ndarray,
                    queries: int = QUERIES, seed: int = 0) -> tuple[float, int]:
    """(recall@10, queries used): the share of each sampled row's exact 10 nearest (over ``embeddings[positions]``,
    ids ``ids``) that ``index`` returns; ``embeddings`` is anything :func:`vectors_at` reads rows of."""
    count = min(queries, len(positions))
    picked = np.sort(np.random.default_rng(seed).choice(len(positions), count, replace=False))
    vectors = vectors_at(embeddings, positions[picked])
    k = min(K, len(positions))
    truth = exact_top(embeddings, positions, ids, vectors, k)
    _, found = index.search(vectors, k)
    hits = sum(len(set(found[i].tolist()) & set(truth[i].tolist())) for i in range(count))
    return round(hits / max(count * k, 1), 4), count
