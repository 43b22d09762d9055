"""Which images are most likely in the wrong cluster: a per-image "likely wrong" score for a review queue.

An image is suspect when the model hesitates between two clusters (a low margin between its top-2
probabilities), when its whole cluster is one the model is unsure of (a mixed cluster holds more mistakes),
and when its nearest neighbours in embedding space sit in another cluster (the embedding and the classifier
head disagree: the one kind of mistake that confidence cannot show). All three terms lie in [0, 1]::

    doubt        = 1 - margin
    disagreement = 1 - (similarity-weighted share of the image's K_NEIGHBOURS nearest images in its own cluster)
    score = w_n * disagreement + (1 - w_n) * ((1 - s) * doubt + s * (mean doubt of the image's cluster))

with w_n = NEIGHBOUR_WEIGHT and s = CLUSTER_SHARE (0 = fine, 1 = suspect). The neighbours are found with FAISS
(cosine) over every labelled image: the whole table at the end of ``twist label``, the stored vectors at
``twist index`` (for every image again after ``--update``, since new images change old images' neighbours).
The "suggestion" of an image is the other cluster holding most neighbour weight (-1 when every neighbour
agrees): the Review view's one-click target.

The weights are the measured choice of ``bench/review.py`` (``bench/results/review.json``: every variant of k,
neighbour weighting and the two mixing weights, on cifar10-test and caltech20). On those models the neighbour
term adds little beyond the margin (the embedding and the head are trained together), so it gets a small
weight; it is kept because it alone finds confident mistakes and names the cluster to move them to.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from twist_core.knn_join import self_neighbours
from twist_core.vectors import build, normalized, plan_index, training_size

Progress = Callable[[Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]],
                    Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]]  # passes blocks through, reporting
K_NEIGHBOURS = 5
WEIGHTING = "softmax"
NEIGHBOUR_WEIGHT = 0.1
CLUSTER_SHARE = 0.5
WEIGHTINGS = ("uniform", "similarity", "softmax")
SOFTMAX_TEMPERATURE = 0.07  # the kNN classifier's usual temperature (sharp: the closest neighbours decide)


@dataclass(frozen=True)
class ReviewSettings:
    k: int = K_NEIGHBOURS
    weighting: str = WEIGHTING
    neighbour_weight: float = NEIGHBOUR_WEIGHT
    cluster_share: float = CLUSTER_SHARE

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {self.weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
        if self.k < 1 or not (0.0 <= self.neighbour_weight <= 1.0 and 0.0 <= self.cluster_share <= 1.0):
            raise ValueError("the review needs k >= 1 and a neighbour weight and cluster share in [0, 1]")


@dataclass(frozen=True)
class Votes:
    """Per image (aligned with the ids given): weighted share of neighbours in its own cluster, and the
    other cluster with most neighbour weight (-1: none)."""

    agreement: np.ndarray
    suggestion: np.ndarray
    neighbours: np.ndarray  # (n, k) ids, -1: none; what an update merges a new image into
    sims: np.ndarray  # (n, k) their similarities, best first


def neighbour_weights(similarities: np.ndarray, weighting: str) -> np.ndarray:
    """How much each neighbour's cluster counts: equally, by cosine (negative = 0), or a sharp softmax."""
    if weighting == "uniform":
        return np.ones_like(similarities)
    if weighting == "similarity":
        return np.clip(similarities, 0.0, None)
    return np.exp((similarities - 1.0) / SOFTMAX_TEMPERATURE)


def vote_batch(own: np.ndarray, neighbour_clusters: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Agreement and suggestion for one batch; a neighbour cluster of -1 (missing neighbour) counts for nothing."""
    weights = np.where(neighbour_clusters >= 0, weights, 0.0)
    total = weights.sum(axis=1)
    same = (weights * (neighbour_clusters == own[:, None])).sum(axis=1)
    agreement = np.where(total > 0, same / np.maximum(total, 1e-12), 1.0)
    others = np.where(neighbour_clusters == own[:, None], 0.0, weights)
    n_clusters = int(max(own.max(initial=0), neighbour_clusters.max(initial=0))) + 1
    tally = np.zeros((len(own), n_clusters), np.float64)
    rows = np.repeat(np.arange(len(own)), neighbour_clusters.shape[1])
    np.add.at(tally, (rows, np.clip(neighbour_clusters, 0, None).ravel()), others.ravel())
    suggestion = np.where(tally.max(axis=1) > 0, tally.argmax(axis=1), -1)
    return agreement.astype(np.float32), suggestion.astype(np.int64)


def neighbour_votes(index: faiss.Index, ids: np.ndarray, clusters: np.ndarray, k: int = K_NEIGHBOURS,
                    weighting: str = WEIGHTING, progress: Progress | None = None) -> Votes:
    """Find every id's ``k`` nearest other stored vectors in ``index`` (vector ids = ``ids``, sorted) and tally
    their clusters: a streaming pass (:func:`twist_core.knn_join.self_neighbours`), one block in memory."""
    ids = np.asarray(ids, np.int64)
    agreement = np.ones(len(ids), np.float32)
    suggestion = np.full(len(ids), -1, np.int64)
    found = np.full((len(ids), max(0, min(k, len(ids) - 1))), -1, np.int64)
    found_sims = np.full(found.shape, -np.inf, np.float32)
    k = min(k, len(ids) - 1)
    if k < 1:
        return Votes(agreement, suggestion, found, found_sims)
    blocks = self_neighbours(index, ids, k)
    for batch, neighbours, neighbour_sims in progress(blocks) if progress else blocks:
        rows = np.searchsorted(ids, batch)
        agreement[rows], suggestion[rows] = tally(ids, clusters, clusters[rows], neighbours, neighbour_sims,
                                                  weighting)
        found[rows], found_sims[rows] = neighbours, neighbour_sims
    return Votes(agreement, suggestion, found, found_sims)


def tally(ids: np.ndarray, clusters: np.ndarray, own: np.ndarray, neighbours: np.ndarray, sims: np.ndarray,
          weighting: str) -> tuple[np.ndarray, np.ndarray]:
    """Agreement and suggestion of queries of cluster ``own`` from their neighbours (ids among sorted ``ids``)."""
    positions = np.searchsorted(ids, neighbours).clip(0, len(ids) - 1)
    neighbour_clusters = np.where((neighbours >= 0) & (ids[positions] == neighbours), clusters[positions], -1)
    return vote_batch(own, neighbour_clusters, neighbour_weights(np.where(neighbours >= 0, sims, 0.0), weighting))


def doubts(margins: np.ndarray) -> np.ndarray:
    """1 - margin, clipped to [0, 1]; a missing margin counts as 0 (no sign of confidence)."""
    return 1.0 - np.nan_to_num(np.asarray(margins, np.float64), nan=0.0).clip(0.0, 1.0)


Stats = dict[int, list[float]]  # cluster -> [mean doubt the scores use, sum of doubts, images]


def cluster_stats(margins: np.ndarray, clusters: np.ndarray) -> Stats:
    """Each cluster's mean doubt (the cluster term of the score), with the sum and count an update moves."""
    clusters = np.asarray(clusters, np.int64)
    known = clusters >= 0
    sums = np.bincount(clusters[known], weights=doubts(margins)[known], minlength=1)
    counts = np.bincount(clusters[known], minlength=1)
    return {int(c): [float(sums[c] / counts[c]), float(sums[c]), float(counts[c])] for c in np.flatnonzero(counts)}


def combine(agreement: np.ndarray, margins: np.ndarray, clusters: np.ndarray,
            settings: ReviewSettings = ReviewSettings(), means: dict[int, float] | None = None) -> np.ndarray:
    """The "likely wrong" score in [0, 1] (see the module); ``means``: each cluster's mean doubt, computed from
    these images when not given (an update scores a few images against the whole index's means)."""
    doubt = doubts(margins)
    clusters = np.asarray(clusters, np.int64)
    means = {c: v[0] for c, v in cluster_stats(margins, clusters).items()} if means is None else means
    table = np.full(max([int(clusters.max(initial=0)), *means]) + 1, np.nan)
    table[list(means)] = list(means.values())
    cluster_doubt = table[clusters.clip(0)]
    cluster_doubt = np.where((clusters >= 0) & np.isfinite(cluster_doubt), cluster_doubt, doubt)
    uncertainty = (1.0 - settings.cluster_share) * doubt + settings.cluster_share * cluster_doubt
    score = settings.neighbour_weight * (1.0 - agreement) + (1.0 - settings.neighbour_weight) * uncertainty
    return score.astype(np.float32)


@dataclass(frozen=True)
class ReviewScores:
    ids: np.ndarray
    score: np.ndarray
    suggestion: np.ndarray
    neighbours: np.ndarray  # (n, k) each image's neighbours and their similarities: what an update builds on
    sims: np.ndarray


def score_index(index: faiss.Index, ids: np.ndarray, clusters: np.ndarray, margins: np.ndarray,
                settings: ReviewSettings = ReviewSettings(), progress: Progress | None = None) -> ReviewScores:
    """Scores of the images ``ids`` (sorted, all in ``index``) from their neighbours and margins."""
    votes = neighbour_votes(index, ids, clusters, settings.k, settings.weighting, progress)
    return ReviewScores(ids, combine(votes.agreement, margins, clusters, settings), votes.suggestion, votes.neighbours,
                        votes.sims)


# ---- twist label: the score of every row, from the run's chunks
def score_chunks(chunks: Callable[[], Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]]], n_rows: int, dim: int,
                 settings: ReviewSettings = ReviewSettings(), seed: int = 0) -> np.ndarray:
    """Per-row score (NaN for error rows, cluster -1) of a table given as chunks ``(clusters, margins, embeddings)``
    in row order; ``chunks()`` is read three times (a sample to train an IVF index, the vectors, the votes).

    The FAISS index is the one ``twist index`` would choose for that many rows (exact up to 50k), so memory
    stays that of an index, never a second copy of the table.
    """
    clusters, margins = np.full(n_rows, -1, np.int64), np.full(n_rows, np.nan, np.float32)
    start = 0
    for chunk_clusters, chunk_margins, _ in chunks():
        clusters[start:start + len(chunk_clusters)] = chunk_clusters
        margins[start:start + len(chunk_margins)] = chunk_margins
        start += len(chunk_clusters)
    rows = np.flatnonzero(clusters >= 0)
    scores = np.full(n_rows, np.nan, np.float32)
    if not len(rows):
        return scores

    def vectors() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        offset = 0
        for chunk_clusters, _, embeddings in chunks():
            good = np.flatnonzero(np.asarray(chunk_clusters) >= 0)
            yield good + offset, normalized(np.asarray(embeddings)[good])
            offset += len(chunk_clusters)

    plan = plan_index(len(rows), dim)
    sample = None
    if plan.nlist:
        size = training_size(plan, len(rows))
        picked = np.sort(np.random.default_rng(seed).choice(rows, size, replace=False))
        sample = np.concatenate([vec[np.isin(pos, picked)] for pos, vec in vectors()])
    index = build(plan, dim, len(rows), vectors, sample)
    found = score_index(index, rows, clusters[rows], margins[rows], settings)
    scores[rows] = found.score
    return scores


def fill_column(rows: list[dict[str, Any]], scores: np.ndarray) -> None:
    """Set the ``review_score`` cell of table rows from their scores (row-aligned; empty for error rows)."""
    for row, score in zip(rows, scores, strict=False):
        row["review_score"] = None if row.get("error") else round(float(score), 6)
