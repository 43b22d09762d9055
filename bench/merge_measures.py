"""The merge measures the guide's table rejected (knn, knn-mean, topk, centroid: bench/results/merge.json), kept
for the bench's comparison and registered into ``twist_core.curate.merges`` by importing this module; the
command line and the app offer only the measures that won.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.sparse import coo_matrix

from twist_core.curate.merges import ClusterData, Evidence, knn_links, positions, register_measure

COMPARED = ("modularity", "knn", "knn-mean", "topk", "centroid")  # every measure of the index alone, best first


def _pair_rate(links: np.ndarray, mass: np.ndarray) -> np.ndarray:
    """Symmetric link rate ``(L_ab + L_ba) / (mass_a + mass_b)`` (0 where both clusters are empty)."""
    both = links + links.T
    total = mass[:, None] + mass[None, :]
    return np.divide(both, total, out=np.zeros_like(both), where=total > 0)



def knn_share(evidence: Evidence, pos: np.ndarray, m: int, weights: np.ndarray, mean: bool) -> np.ndarray:
    """Share of a cluster's kNN links that land in the other, the larger of the two directions (``mean``: all
    links between the two over all links of both, which keeps a small cluster inside a big one apart)."""
    links = knn_links(evidence, pos, m, weights)
    out = np.bincount(pos[evidence.queries], weights[evidence.queries], m) * evidence.neighbours.shape[1]
    if mean:
        return _pair_rate(links, out)
    share = np.divide(links, out[:, None], out=np.zeros_like(links), where=out[:, None] > 0)
    return np.maximum(share, share.T)



def merged_topk(clusters: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image, each cluster's total probability among its top entries (entries merged into one cluster add
    up); repeated entries and absent ones (-1) become -1."""
    same = (clusters[:, :, None] == clusters[:, None, :]) & (clusters[:, :, None] >= 0)
    total = (same * probs[:, None, :]).sum(axis=2)
    t = clusters.shape[1]
    earlier = np.tril(np.ones((t, t), bool), -1)  # entry u has the same cluster as an earlier entry v < u
    repeated = (same & earlier[None]).any(axis=2)
    return np.where(repeated | (clusters < 0), -1, clusters), total



def topk_mass(data: ClusterData, pos_of: np.ndarray, m: int, weights: np.ndarray) -> np.ndarray:
    """Shared mass ``sum_i min(p_ia, p_ib)`` over the clusters' total mass: at most 1, whoever holds it."""
    mapped = np.where(data.topk_clusters >= 0, pos_of[np.clip(data.topk_clusters, 0, None)], -1)
    clusters, totals = merged_topk(mapped, data.topk_probs)
    links = np.zeros(m * m)
    t = clusters.shape[1]
    for u in range(t):
        for v in range(u + 1, t):
            ok = (clusters[:, u] >= 0) & (clusters[:, v] >= 0)
            shared = np.minimum(totals[ok, u], totals[ok, v]) * weights[ok]
            links += np.bincount(clusters[ok, u] * m + clusters[ok, v], shared, m * m)
    present = clusters >= 0
    mass = np.bincount(clusters[present], (totals * weights[:, None])[present], m)
    return 2 * _pair_rate(links.reshape(m, m), mass)



def centroid_cosine(data: ClusterData, pos: np.ndarray, m: int, weights: np.ndarray) -> np.ndarray:
    member = coo_matrix((weights, (pos, np.arange(len(pos)))), shape=(m, len(pos))).tocsr()
    sums = np.asarray(member @ data.vectors)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    means = np.divide(sums, norms, out=np.zeros_like(sums), where=norms > 0)
    return means @ means.T




def knn(data: ClusterData, evidence: Evidence, clusters: Sequence[int], labels: np.ndarray,
        weights: np.ndarray) -> np.ndarray:
    return knn_share(evidence, positions(data, clusters, labels)[1], len(clusters), weights, mean=False)


def knn_mean(data: ClusterData, evidence: Evidence, clusters: Sequence[int], labels: np.ndarray,
             weights: np.ndarray) -> np.ndarray:
    return knn_share(evidence, positions(data, clusters, labels)[1], len(clusters), weights, mean=True)


def topk(data: ClusterData, evidence: Evidence, clusters: Sequence[int], labels: np.ndarray,
         weights: np.ndarray) -> np.ndarray:
    return topk_mass(data, positions(data, clusters, labels)[0], len(clusters), weights)


def centroid(data: ClusterData, evidence: Evidence, clusters: Sequence[int], labels: np.ndarray,
             weights: np.ndarray) -> np.ndarray:
    return centroid_cosine(data, positions(data, clusters, labels)[1], len(clusters), weights)


for _name, _measure in (("knn", knn), ("knn-mean", knn_mean), ("topk", topk), ("centroid", centroid)):
    register_measure(_name, _measure)
