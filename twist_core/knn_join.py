"""Each stored vector's nearest other stored vectors: the all-against-all search behind the review score.

Searching every image as a query through FAISS costs a scan per query (95 % of a 1M-image build, measured in
docs/measurements.md). An IVF index already groups the vectors, so the join runs list by list instead: the
members of one list against the members of the ``nprobe`` lists nearest to its centroid, as one matrix
product (BLAS, ``faiss.knn``), which finds the neighbours a per-query probe would find for all but the images
at a list's border.
A flat (exact) index is searched batch by batch. Memory stays that of one list block, never a copy of the index.
"""

from __future__ import annotations

from collections.abc import Iterator

import faiss
import numpy as np

from twist_core.vectors import drop_self, normalized

SEARCH_BATCH = 4096
JOIN_NPROBE = 8  # lists joined per list: recall of the neighbours as with 16 (bench/index_layout.py), half the CPU
DECODED_BYTES = 1 << 30  # decoded lists kept for reuse: a list is a candidate of ~nprobe others


def self_neighbours(index: faiss.Index, ids: np.ndarray, k: int,
                    nprobe: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Blocks ``(query ids, neighbour ids, similarities)``, ``k`` per query best first (-1 / -inf: none).

    Every id of ``ids`` is a query exactly once; an IVF index is joined list by list (``nprobe`` lists, default
    at most ``JOIN_NPROBE``), other kinds searched by their stored vectors.
    """
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None or len(ids) < ivf.ntotal:
        yield from _searched(index, np.asarray(ids, np.int64), k)
        return
    yield from _joined(ivf, k, int(nprobe or min(ivf.nprobe, JOIN_NPROBE)))


def _searched(index: faiss.Index, ids: np.ndarray, k: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    wanted = min(k + 1, index.ntotal)
    for start in range(0, len(ids), SEARCH_BATCH):
        batch = ids[start:start + SEARCH_BATCH]
        sims, found = index.search(normalized(index.reconstruct_batch(batch)), wanted)
        if wanted <= k:  # fewer stored vectors than k + 1: pad so drop_self keeps k columns
            pad = k + 1 - wanted
            found = np.hstack([found, np.full((len(batch), pad), -1, np.int64)])
            sims = np.hstack([sims, np.full((len(batch), pad), -np.inf, np.float32)])
        neighbours, neighbour_sims = drop_self(batch, found, sims, k)
        yield batch, neighbours, neighbour_sims


def _list_ids(ivf: faiss.IndexIVF, number: int) -> np.ndarray:
    size = ivf.invlists.list_size(number)
    if not size:
        return np.zeros(0, np.int64)
    return faiss.rev_swig_ptr(ivf.invlists.get_ids(number), size).copy()


class _ListVectors:
    """The stored vectors of one inverted list: a view of an IVF-flat list's codes (no copy), else decoded once
    and kept while they fit ``budget`` bytes (all of a 1M-image 128-d index), oldest dropped first."""

    def __init__(self, ivf: faiss.IndexIVF, budget: int = DECODED_BYTES) -> None:
        self.ivf, self.budget, self.cache, self.held = ivf, budget, {}, 0
        self.flat = isinstance(ivf, faiss.IndexIVFFlat)

    def __call__(self, number: int, ids: np.ndarray) -> np.ndarray:
        if self.flat:
            codes = faiss.rev_swig_ptr(self.ivf.invlists.get_codes(number), len(ids) * self.ivf.code_size)
            return codes.view(np.float32).reshape(len(ids), self.ivf.d)
        if number not in self.cache:
            self.cache[number] = self.ivf.reconstruct_batch(ids)
            self.held += self.cache[number].nbytes
            while self.held > self.budget and len(self.cache) > 1:
                self.held -= self.cache.pop(next(iter(self.cache))).nbytes
        return self.cache[number]


def _joined(ivf: faiss.IndexIVF, k: int, nprobe: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    _, probes = ivf.quantizer.search(centroids, min(nprobe, ivf.nlist))
    lists = [_list_ids(ivf, number) for number in range(ivf.nlist)]
    vectors_of = _ListVectors(ivf)
    for number, members in enumerate(lists):
        if not len(members):
            continue
        probed = [number, *(int(p) for p in probes[number] if p >= 0 and p != number)]
        candidates = np.concatenate([lists[p] for p in probed])
        vectors = np.concatenate([vectors_of(p, lists[p]) for p in probed])
        wanted = min(k + 1, len(candidates))
        sims, found = faiss.knn(vectors[:len(members)], vectors, wanted, metric=faiss.METRIC_INNER_PRODUCT)
        found = np.where(found >= 0, candidates[found.clip(0)], -1)
        if wanted <= k:
            found = np.hstack([found, np.full((len(members), k + 1 - wanted), -1, np.int64)])
            sims = np.hstack([sims, np.full((len(members), k + 1 - wanted), -np.inf, np.float32)])
        yield (members, *drop_self(members, found, sims, k))
