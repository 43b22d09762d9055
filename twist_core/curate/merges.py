"""``twist suggest-merges INDEX``: which clusters of an over-clustered model belong together, and how many there are.

Train with more clusters than you expect, index the folder, then ask which pairs to merge. Two clusters are
alike when the images of one have their nearest neighbours in the other: by default a pair ranks by how much
merging it would raise the modularity of the kNN graph of the embeddings (links between the two beyond what
their sizes predict); ``--measure knn`` uses the share of a cluster's kNN links that land in the other,
``topk`` the probability mass an image shares between its top clusters, ``centroid`` the cosine between
cluster means, ``views`` how often the model itself puts two augmented views of an image into the two clusters
(it runs the index's model on the images again: ``--view-pairs`` pairs per image), ``heads`` how much the two
share the clusters of the model's coarse heads (a model trained with ``--coarse-classes``; one pass over the
images), which is the measure to use when the model has them. A scipy
average-linkage hierarchy over ``1 - similarity`` gives the dendrogram; the cut of it whose groups make the
kNN graph most modular estimates the number of groups, with a range from a bootstrap over the images.
``--to N`` also prints a plan down to N groups: the greedy merges, then single clusters moved between groups
while that raises the modularity (whole clusters only, so the app can apply it merge by merge).

Input: an index folder of ``twist index`` (with ``--state-dir`` the app's curation is respected: merges,
moves and exclusions), or a labels table of ``twist label`` (its .embeddings.npy beside it). A training run
folder has no embeddings of your images: export, label and index it first.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from scipy.cluster.hierarchy import cut_tree, linkage
from scipy.sparse import coo_matrix
from scipy.spatial.distance import squareform

from twist_core.config import AutoConfig, option
from twist_core.curate.store_file import curation_path
from twist_core.errors import UserError
from twist_core.index.store import MetaStore, meta_path, read_manifest
from twist_core.io_utils import path_from_text
from twist_core.layout import CONFIG_FILE, CURATION_FILE, INDEX_FILE, MANIFEST, META_FILE

VIEW_PAIRS = 4  # two forward passes per image each; the pairs bench/merge_views.py measured

MEASURES = ("modularity", "knn", "knn-mean", "topk", "centroid")  # from the index alone
VIEWS = "views"  # these two also need the model and the images (twist_core.curate.view_graph)
HEADS = "heads"
MODEL_GRAPHS = (VIEWS, HEADS)  # measures whose evidence is a graph of the model's clusters
DEFAULT_MEASURE = "modularity"
LINKAGE_METHOD = "average"
RANGE_QUANTILES = (0.05, 0.95)


class MergeUserError(UserError):
    """A problem the user can fix (wrong input, too few clusters); the message says which."""


@dataclass
class MergesConfig(AutoConfig):
    source: str | None = option(None, "index folder of twist index (or a labels table of twist label); a "
                                "training run must be exported, labelled and indexed first")
    state_dir: str | None = option(None, "the app's --state-dir: suggest over the curated clusters (its merges, "
                                   "moves and exclusions applied)")
    measure: str = option(DEFAULT_MEASURE, "similarity of two clusters: modularity = how much merging them "
                          "raises the modularity of the kNN graph (links beyond what their sizes predict), knn = "
                          "share of one cluster's nearest-neighbour links that land in the other, knn-mean = links "
                          "between them over both clusters' links, topk = probability mass their images share, "
                          "centroid = cosine of the means, views = how often the model puts two augmented views "
                          "of one image into the two (runs the index's model on the images again), heads = how "
                          "much their images share the clusters of the model's coarse heads (a model trained with "
                          "--coarse-classes; the measure to use for such a model)",
                          choices=[*MEASURES, *MODEL_GRAPHS])
    view_pairs: int = option(VIEW_PAIRS, "measure views: augmented view pairs per image (two forward passes "
                                              "each)")
    neighbours: int = option(10, "neighbours per image in the kNN graph (knn measures and the K estimate)")
    max_queries: int = option(20000, "images whose neighbours are searched, and (measure views) whose views are run "
                                     "(a random sample beyond this)")
    top: int = option(15, "ranked pairs to print")
    bootstrap: int = option(200, "bootstrap resamples of the images for the range of the K estimate (0: none)")
    seed: int = option(0, "seed of the query sample and the bootstrap")
    json: str | None = option(None, "also write pairs, hierarchy and K estimate to this JSON file")
    plot: str | None = option(None, "also draw the dendrogram to this PNG file")
    to: int | None = option(None, "also plan merges down to this many groups: greedy merges of the top "
                            "suggestion, then single clusters moved between groups while the kNN graph's "
                            "modularity rises")


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


@dataclass(frozen=True)
class KEstimate:
    """The number of groups the hierarchy suggests, how sure that is, and the largest-gap alternative."""

    k: int
    low: int
    high: int
    support: float  # share of bootstrap resamples that gave exactly ``k``
    modularity: list[float]  # of the cut into 1, 2, ..., m groups
    by_gap: int | None  # the cut before the largest gap between successive merge heights
    resamples: int

    def as_dict(self) -> dict[str, Any]:
        return {"k": self.k, "range": [self.low, self.high], "support": round(self.support, 3),
                "resamples": self.resamples, "by_gap": self.by_gap,
                "modularity": [round(q, 5) for q in self.modularity],
                "method": "the cut of the hierarchy whose groups maximise the modularity of the kNN graph of the "
                          "images; range: 5th-95th percentile over bootstrap resamples of the images"}


@dataclass(frozen=True)
class MergePlan:
    """Whole clusters grouped into ``target`` groups; each group is merged into its largest cluster."""

    target: int
    groups: list[list[int]]  # the clusters of each group, the one they go into first
    merges: list[tuple[int, int]]  # (source, into)
    modularity: float  # of the cluster graph (``graph``) with the planned groups
    greedy_modularity: float  # with the greedy merges alone, before clusters were moved between groups (heads:
    # with each cluster in its coarse cluster, before groups were merged or split to reach the target)
    graph: str = "kNN"  # the graph planned on: kNN (of the embeddings), view or heads (those measures)

    def as_dict(self) -> dict[str, Any]:
        return {"target": self.target, "groups": self.groups, "merges": [list(m) for m in self.merges],
                "modularity": round(self.modularity, 5), "greedy_modularity": round(self.greedy_modularity, 5),
                "graph": self.graph}


@dataclass(frozen=True)
class Suggestions:
    """Ranked pairs, the hierarchy over the current clusters and the K estimate."""

    measure: str
    clusters: list[int]  # leaf order of ``linkage`` rows
    sizes: dict[int, int]
    names: dict[int, str]
    similarity: np.ndarray  # (m, m) over ``clusters``
    linkage: np.ndarray  # scipy linkage matrix over ``clusters``
    pairs: list[tuple[int, int, float]]  # (cluster, cluster, similarity), most similar first
    k_estimate: KEstimate | None
    plan: MergePlan | None = None

    def label(self, cluster: int) -> str:
        return f"{cluster} {self.names.get(cluster, '')}".strip()

    def as_dict(self, top: int | None = None) -> dict[str, Any]:
        pairs = self.pairs if top is None else self.pairs[:top]
        return {"measure": self.measure, "linkage_method": LINKAGE_METHOD,
                "clusters": [{"cluster": c, "name": self.names.get(c, ""), "size": self.sizes[c]}
                             for c in self.clusters],
                "pairs": [{"a": a, "b": b, "name_a": self.names.get(a, ""), "name_b": self.names.get(b, ""),
                           "size_a": self.sizes[a], "size_b": self.sizes[b], "similarity": round(s, 6)}
                          for a, b, s in pairs],
                "linkage": [[int(r[0]), int(r[1]), float(r[2]), int(r[3])] for r in self.linkage],
                "k_estimate": self.k_estimate.as_dict() if self.k_estimate else None,
                "plan": self.plan.as_dict() if self.plan else None}


# ---- the evidence each measure is computed from (once), then weighed per image (bootstrap)
@dataclass(frozen=True)
class Evidence:
    """The kNN graph (every measure's K estimate uses it), searched once and re-weighed for each resample."""

    measure: str
    queries: np.ndarray  # positions of the images whose neighbours were searched
    neighbours: np.ndarray  # (len(queries), k) positions of their neighbours
    model_graph: np.ndarray | None = None  # measures views/heads: the model's cluster graph, over cluster ids
    coarse_shares: tuple[np.ndarray, ...] = ()  # measure heads: mass each cluster shares with each coarse cluster


def nearest_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` most similar other images (cosine) of each query, exact (flat FAISS)."""
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    k = min(k, len(vectors) - 1)
    _, found = index.search(np.ascontiguousarray(vectors[queries], dtype=np.float32), k + 1)
    others = found != queries[:, None]  # the query itself, wherever a duplicate put it
    keep = np.cumsum(others, axis=1) <= k
    return found[others & keep].reshape(len(queries), k)


def gather_evidence(data: ClusterData, measure: str, neighbours: int = 10, max_queries: int = 20000,
                    seed: int = 0, model_graph: np.ndarray | None = None,
                    coarse_shares: Sequence[np.ndarray] = ()) -> Evidence:
    """The kNN graph of (a sample of) the images; with measure views also ``model_graph``, the model's joint of
    two views' clusters, with measure heads ``coarse_shares`` (:mod:`twist_core.curate.view_graph`), each mapped
    through curation's merges (the heads' graph of the clusters is :func:`heads_graph` of the shares)."""
    if measure not in (*MEASURES, *MODEL_GRAPHS):
        raise MergeUserError(f"unknown measure {measure!r}; choose one of {', '.join((*MEASURES, *MODEL_GRAPHS))}")
    if measure == HEADS and coarse_shares:
        coarse_shares = tuple(shares_by_cluster(share, data) for share in coarse_shares)
        model_graph = heads_graph(coarse_shares)
    if measure in MODEL_GRAPHS and model_graph is None:
        raise MergeUserError(f"measure {measure} needs the model and the images: give an index folder (twist index), "
                             "whose model and image folder are still where they were, or use another measure")
    n = len(data.labels)
    if neighbours < 1:
        raise MergeUserError("--neighbours must be at least 1")
    queries = np.arange(n)
    if n > max_queries > 0:
        queries = np.sort(np.random.default_rng(seed).choice(n, max_queries, replace=False))
    if measure != HEADS and model_graph is not None:
        model_graph = graph_by_cluster(model_graph, data)
    return Evidence(measure, queries, nearest_neighbours(data.vectors, queries, neighbours), model_graph,
                    tuple(coarse_shares))


def heads_graph(shares: Sequence[np.ndarray]) -> np.ndarray:
    """``K x K`` graph of the clusters by the coarse heads, summing to 1: per head ``S diag(1/q) S^T`` (``S`` the
    shares, ``q`` the coarse clusters' mass), so two clusters are linked as far as their images fall in the same
    coarse clusters, weighed by how small those are; heads averaged."""
    graphs = [(share / share.sum(0).clip(min=1e-12)) @ share.T for share in shares]
    graph = sum(g / max(g.sum(), 1e-12) for g in graphs) / len(graphs)
    return (graph + graph.T) / 2


def _curation_members(n_model_clusters: int, data: ClusterData) -> np.ndarray:
    """``K x size`` 0/1: which cluster curation left each of the model's clusters in (merges applied)."""
    size = max(n_model_clusters, int(data.labels.max(initial=-1)) + 1)
    into = np.arange(n_model_clusters)
    for source, target in data.merged_into.items():
        if source < n_model_clusters:
            into[source] = target
    member = np.zeros((n_model_clusters, size))
    member[np.arange(n_model_clusters), into] = 1.0
    return member


def graph_by_cluster(graph: np.ndarray, data: ClusterData) -> np.ndarray:
    """The model's ``K x K`` cluster graph summed into the clusters curation left (row/column = cluster id)."""
    member = _curation_members(len(graph), data)
    return member.T @ graph @ member


def shares_by_cluster(share: np.ndarray, data: ClusterData) -> np.ndarray:
    """A coarse head's ``K x coarse K`` shares summed into the clusters curation left (row = cluster id)."""
    return _curation_members(len(share), data).T @ share


def _model_graph(data: ClusterData, evidence: Evidence, clusters: Sequence[int], labels: np.ndarray
                 ) -> np.ndarray:
    """``m x m`` model graph between ``clusters`` once the images are labelled ``labels`` (whole-cluster merges
    of ``data.labels``, as planning makes them); clusters without images drop out."""
    assert evidence.model_graph is not None
    owner = np.arange(len(evidence.model_graph))
    owner[data.labels] = labels
    pos_of = np.full(max(len(owner), max(clusters) + 1), -1)
    pos_of[list(clusters)] = np.arange(len(clusters))
    pos = pos_of[owner]
    keep = pos >= 0
    member = np.eye(len(clusters))[pos[keep]]
    return member.T @ evidence.model_graph[np.ix_(keep, keep)] @ member


def _pair_rate(links: np.ndarray, mass: np.ndarray) -> np.ndarray:
    """Symmetric link rate ``(L_ab + L_ba) / (mass_a + mass_b)`` (0 where both clusters are empty)."""
    both = links + links.T
    total = mass[:, None] + mass[None, :]
    return np.divide(both, total, out=np.zeros_like(both), where=total > 0)


def knn_links(evidence: Evidence, pos: np.ndarray, m: int, weights: np.ndarray) -> np.ndarray:
    """``m x m`` weighted counts of kNN edges from images of cluster a (position) to images of cluster b."""
    k = evidence.neighbours.shape[1]
    a = np.repeat(pos[evidence.queries], k)
    b = pos[evidence.neighbours].ravel()
    w = np.repeat(weights[evidence.queries], k)
    return np.bincount(a * m + b, w, m * m).reshape(m, m)


def _modularity_similarity(evidence: Evidence, pos: np.ndarray, m: int, weights: np.ndarray) -> np.ndarray:
    """How much merging two clusters would change the modularity of the kNN graph (links between them beyond what
    their degrees predict: ``e_ab - a_a a_b``), scaled to [0, 1] over the pairs: the best pair is 1, the worst 0.

    Near the end every merge lowers modularity; the scaling keeps the least harmful pair first."""
    return _scaled_gain(knn_links(evidence, pos, m, weights))


def _scaled_gain(graph: np.ndarray) -> np.ndarray:
    """The modularity gain ``e_ab - a_a a_b`` of merging each pair of a cluster graph, scaled to [0, 1]."""
    m = len(graph)
    graph = graph + graph.T
    total = graph.sum()
    if total <= 0 or m < 2:
        return np.zeros((m, m))
    graph /= total
    degree = graph.sum(axis=1)
    gain = graph - np.outer(degree, degree)
    upper = gain[np.triu_indices(m, 1)]
    low, high = upper.min(), upper.max()
    return (gain - low) / (high - low) if high > low else np.zeros((m, m))


def _knn_similarity(evidence: Evidence, pos: np.ndarray, m: int, weights: np.ndarray, mean: bool) -> np.ndarray:
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


def _topk_similarity(data: ClusterData, pos_of: np.ndarray, m: int, weights: np.ndarray) -> np.ndarray:
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


def _centroid_similarity(data: ClusterData, pos: np.ndarray, m: int, weights: np.ndarray) -> np.ndarray:
    member = coo_matrix((weights, (pos, np.arange(len(pos)))), shape=(m, len(pos))).tocsr()
    sums = np.asarray(member @ data.vectors)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    means = np.divide(sums, norms, out=np.zeros_like(sums), where=norms > 0)
    return means @ means.T


def _weights(data: ClusterData, weights: np.ndarray | None) -> np.ndarray:
    return np.ones(len(data.labels)) if weights is None else weights


def _positions(data: ClusterData, clusters: Sequence[int], labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cluster id -> position in ``clusters`` (-1 for any other id), and each image's position."""
    pos_of = np.full(max(int(labels.max()), int(data.topk_clusters.max(initial=0)), max(clusters)) + 1, -1)
    pos_of[list(clusters)] = np.arange(len(clusters))
    return pos_of, pos_of[labels]


def similarity(data: ClusterData, evidence: Evidence, clusters: Sequence[int], labels: np.ndarray | None = None,
               weights: np.ndarray | None = None) -> np.ndarray:
    """``m x m`` similarity in [0, 1] of ``clusters`` (images labelled by ``labels``, default ``data.labels``)."""
    labels = data.labels if labels is None else labels
    weights = _weights(data, weights)
    m = len(clusters)
    pos_of, pos = _positions(data, clusters, labels)
    if evidence.measure == "modularity":
        result = _modularity_similarity(evidence, pos, m, weights)
    elif evidence.measure in MODEL_GRAPHS:
        result = _scaled_gain(_model_graph(data, evidence, clusters, labels))
    elif evidence.measure in ("knn", "knn-mean"):
        result = _knn_similarity(evidence, pos, m, weights, mean=evidence.measure == "knn-mean")
    elif evidence.measure == "topk":
        result = _topk_similarity(data, pos_of, m, weights)
    else:
        result = _centroid_similarity(data, pos, m, weights)
    result = np.clip(result, 0.0, 1.0)
    np.fill_diagonal(result, 1.0)
    return result


def hierarchy(sim: np.ndarray) -> np.ndarray:
    """scipy's average linkage over the distance ``1 - similarity``."""
    distance = 1.0 - sim
    np.fill_diagonal(distance, 0.0)
    return linkage(squareform(distance, checks=False), method=LINKAGE_METHOD)


def largest_gap_k(heights: np.ndarray) -> int | None:
    """Groups left by the cut before the largest gap between successive merge heights (at least one merge)."""
    if len(heights) < 2:
        return None
    return len(heights) - int(np.argmax(np.diff(heights)))


def modularity_of_cuts(links: np.ndarray, link: np.ndarray) -> np.ndarray:
    """Newman's modularity of the kNN graph for every cut of the hierarchy: entry g - 1 for g groups.

    ``links[a, b]``: kNN edges from images of leaf a to images of leaf b. High when the groups hold their
    neighbours and few edges cross; unlike a gap in merge heights it does not depend on the scale of the measure.
    """
    graph = links + links.T
    total = graph.sum()
    m = len(graph)
    if total <= 0:
        return np.zeros(m)
    graph = graph / total
    cuts = cut_tree(link)[:, ::-1]  # column g - 1: g groups
    same = cuts[:, None, :] == cuts[None, :, :]
    inside = np.einsum("ab,abg->g", graph, same)
    degree = graph.sum(axis=1)
    spread = np.array([np.sum(np.bincount(cuts[:, g], degree) ** 2) for g in range(m)])
    return inside - spread


def best_cut(data: ClusterData, evidence: Evidence, clusters: Sequence[int], weights: np.ndarray | None = None,
             link: np.ndarray | None = None) -> tuple[int, np.ndarray]:
    """Groups of the most modular cut (the fewest among ties) and every cut's modularity."""
    if link is None:
        link = hierarchy(similarity(data, evidence, clusters, weights=weights))
    pos, m = _positions(data, clusters, data.labels)[1:], len(clusters)
    quality = modularity_of_cuts(knn_links(evidence, pos[0], m, _weights(data, weights)), link)
    return int(np.argmax(quality)) + 1, quality


def estimate_k(data: ClusterData, evidence: Evidence, clusters: Sequence[int], link: np.ndarray,
               resamples: int, seed: int) -> KEstimate | None:
    """The most modular cut of ``link`` and its bootstrap range (images drawn with replacement, Poisson weights)."""
    if len(clusters) < 2 or not len(evidence.queries):
        return None
    k, quality = best_cut(data, evidence, clusters, link=link)
    rng = np.random.default_rng(seed)
    found = [best_cut(data, evidence, clusters, rng.poisson(1.0, len(data.labels)).astype(np.float64))[0]
             for _ in range(resamples)]
    low, high = (int(q) for q in np.quantile(found, RANGE_QUANTILES, method="nearest")) if found else (k, k)
    support = float(np.mean(np.array(found) == k)) if found else 1.0
    return KEstimate(k, min(low, k), max(high, k), support, [float(q) for q in quality],
                     largest_gap_k(link[:, 2]), len(found))


def ranked_pairs(sim: np.ndarray, clusters: Sequence[int]) -> list[tuple[int, int, float]]:
    upper = np.triu_indices(len(clusters), 1)
    order = np.argsort(-sim[upper], kind="stable")
    return [(clusters[upper[0][i]], clusters[upper[1][i]], float(sim[upper][i])) for i in order]


def current_clusters(labels: np.ndarray) -> tuple[list[int], dict[int, int]]:
    values, counts = np.unique(labels, return_counts=True)
    return [int(v) for v in values], {int(v): int(c) for v, c in zip(values, counts, strict=True)}


def suggest(data: ClusterData, measure: str = DEFAULT_MEASURE, neighbours: int = 10, max_queries: int = 20000,
            resamples: int = 200, seed: int = 0, evidence: Evidence | None = None,
            to: int | None = None) -> Suggestions:
    """Ranked merge suggestions, the hierarchy and the K estimate over the clusters of ``data`` (and with ``to``
    a plan down to that many groups)."""
    clusters, sizes = current_clusters(data.labels)
    if len(clusters) < 2:
        raise MergeUserError(f"only {len(clusters)} cluster holds images: there is nothing to merge")
    evidence = evidence or gather_evidence(data, measure, neighbours, max_queries, seed)
    sim = similarity(data, evidence, clusters)
    link = hierarchy(sim)
    k_estimate = estimate_k(data, evidence, clusters, link, resamples, seed)
    if to is not None and not 1 <= to < len(clusters):
        raise MergeUserError(f"--to must be from 1 to {len(clusters) - 1} (there are {len(clusters)} clusters)")
    plan = plan_merges(data, evidence, to) if to is not None else None
    return Suggestions(evidence.measure, clusters, sizes, data.names, sim, link, ranked_pairs(sim, clusters),
                       k_estimate, plan)


def greedy_merges(data: ClusterData, evidence: Evidence, target: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Merge the top suggestion, recompute, repeat until ``target`` clusters: what clicking the first suggestion
    in the app does. Returns the merged labels and the (source, into) merges; the larger cluster keeps its id."""
    labels = data.labels.copy()
    merges: list[tuple[int, int]] = []
    while True:
        clusters, sizes = current_clusters(labels)
        if len(clusters) <= target:
            return labels, merges
        a, b, _ = ranked_pairs(similarity(data, evidence, clusters, labels), clusters)[0]
        into, source = (a, b) if sizes[a] >= sizes[b] else (b, a)
        labels[labels == source] = into
        merges.append((source, into))


def group_modularity(graph: np.ndarray, groups: np.ndarray) -> float:
    """Newman's modularity of a symmetric cluster graph (summing to 1) when cluster i is in group ``groups[i]``."""
    member = np.eye(groups.max() + 1)[groups]
    inside = member.T @ graph @ member
    return float(np.trace(inside) - np.sum(inside.sum(axis=1) ** 2))


def refine_groups(graph: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Move single clusters to the group that raises the modularity most, until no move raises it (no group is
    emptied). Greedy merging never revisits a merge; this mends the ones a later merge made wrong."""
    groups = groups.copy()
    degree = graph.sum(axis=1)
    moved = True
    while moved:
        moved = False
        for leaf in range(len(groups)):
            own = groups[leaf]
            if np.count_nonzero(groups == own) == 1:
                continue
            links = np.bincount(groups, graph[leaf], groups.max() + 1)
            links[own] -= graph[leaf, leaf]
            totals = np.bincount(groups, degree, groups.max() + 1)
            totals[own] -= degree[leaf]
            gain = 2 * (links - links[own]) - 2 * degree[leaf] * (totals - totals[own])
            best = int(np.argmax(gain))
            if gain[best] > 1e-12:
                groups[leaf], moved = best, True
    return groups


def head_plan(data: ClusterData, evidence: Evidence, target: int) -> MergePlan:
    """Measure heads: each cluster joins the coarse cluster it shares most of its mass with, in the coarse head
    whose size is nearest ``target`` (the larger on a tie). Groups beyond ``target`` are then merged by the
    largest heads-graph modularity gain; below it, the cluster least held by its coarse cluster leaves its group.
    Each group goes into its largest cluster."""
    clusters, sizes = current_clusters(data.labels)
    head = min(evidence.coarse_shares, key=lambda share: (abs(share.shape[1] - target), -share.shape[1]))
    rows = head[clusters]
    groups = np.unique(rows.argmax(1), return_inverse=True)[1]
    links = _model_graph(data, evidence, clusters, data.labels)
    graph = (links + links.T) / max(2 * links.sum(), 1e-12)
    following = group_modularity(graph, groups)
    while groups.max() + 1 > target:
        member = np.eye(groups.max() + 1)[groups]
        gain = _scaled_gain(member.T @ graph @ member)
        np.fill_diagonal(gain, -np.inf)
        a, b = sorted(np.unravel_index(int(np.argmax(gain)), gain.shape))
        groups = np.unique(np.where(groups == b, a, groups), return_inverse=True)[1]
    held = rows.max(1) / rows.sum(1).clip(min=1e-12)
    while groups.max() + 1 < min(target, len(clusters)):
        shared = np.bincount(groups)[groups] > 1
        leaving = int(np.flatnonzero(shared)[np.argmin(held[shared])])
        groups[leaving] = groups.max() + 1
    return _as_plan(target, clusters, sizes, groups, graph, following, HEADS)


def _as_plan(target: int, clusters: list[int], sizes: dict[int, int], groups: np.ndarray, graph: np.ndarray,
             before: float, graph_name: str) -> MergePlan:
    members = [sorted((c for c, g in zip(clusters, groups, strict=True) if g == group),
                      key=lambda c: (-sizes[c], c)) for group in np.unique(groups)]
    members.sort(key=lambda group: -sum(sizes[c] for c in group))
    plan = [(source, group[0]) for group in members for source in group[1:]]
    return MergePlan(target, members, plan, group_modularity(graph, groups), before, graph_name)


def plan_merges(data: ClusterData, evidence: Evidence, target: int) -> MergePlan:
    """:func:`greedy_merges` down to ``target``, then :func:`refine_groups` on the kNN graph of the clusters (the
    model's graph with measures views and heads); each group goes into its largest cluster. Whole clusters only:
    the app applies it merge by merge."""
    if evidence.measure == HEADS:
        return head_plan(data, evidence, target)
    clusters, sizes = current_clusters(data.labels)
    merged, _ = greedy_merges(data, evidence, target)
    if evidence.measure in MODEL_GRAPHS:
        links = _model_graph(data, evidence, clusters, data.labels)
    else:
        links = knn_links(evidence, _positions(data, clusters, data.labels)[1], len(clusters),
                          np.ones(len(data.labels)))
    graph = (links + links.T) / max(2 * links.sum(), 1e-12)
    greedy = np.unique([merged[data.labels == c][0] for c in clusters], return_inverse=True)[1]
    groups = refine_groups(graph, greedy)
    return _as_plan(target, clusters, sizes, groups, graph, group_modularity(graph, greedy),
                    "view" if evidence.measure == VIEWS else "kNN")


def planned_labels(data: ClusterData, plan: MergePlan) -> np.ndarray:
    """Each image's cluster once ``plan`` is applied."""
    into = {source: target for source, target in plan.merges}
    return np.array([into.get(int(c), int(c)) for c in data.labels], np.int64)


# ---- inputs
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


def _index_names(store: MetaStore) -> dict[int, str]:
    return {int(c["cluster"]): c["name"] or f"cluster {c['cluster']}" for c in store.cluster_summary()
            if c["cluster"] is not None}


def data_from_index(index_dir: Path, state_dir: Path | None = None, store: Any = None) -> ClusterData:
    """Embeddings and top-k of an index; with the app's curation (its state folder, or its open ``store``) the
    curated labels, excluded images left out."""
    manifest = read_manifest(index_dir)
    folder = index_dir / manifest["dir"]
    meta = MetaStore(folder / META_FILE)
    try:
        names = _index_names(meta)
        ids = meta.all_ids()
        rows = meta.rows(ids.tolist())
    finally:
        meta.close()
    cpu_index = faiss.read_index(str(folder / INDEX_FILE))
    vectors = cpu_index.reconstruct_batch(ids) if len(ids) else np.zeros((0, cpu_index.d), np.float32)
    labels = {int(i): rows[int(i)]["cluster"] for i in ids}
    merged: dict[int, int] = {}
    if store is not None:
        labels, names, merged = curated_labels(store)
    elif state_dir is not None:
        labels, names, merged = labels_from_state(index_dir, state_dir, folder / META_FILE, names)
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
    from twist_core.index.build import load_labels

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


# ---- output
def format_suggestions(result: Suggestions, top: int) -> str:
    lines = [f"{'#':>3}  {'similarity':>10}  cluster A (size)  +  cluster B (size)"]
    for rank, (a, b, s) in enumerate(result.pairs[:top], 1):
        lines.append(f"{rank:>3}  {s:>10.4f}  {result.label(a)} ({result.sizes[a]})  +  "
                     f"{result.label(b)} ({result.sizes[b]})")
    estimate = result.k_estimate
    if estimate is None:
        lines.append(f"K estimate: needs at least 2 clusters (there are {len(result.clusters)})")
    else:
        lines.append(f"K estimate: {estimate.k} (range {estimate.low}-{estimate.high} over {estimate.resamples} "
                     f"bootstrap resamples of the images, {estimate.support:.0%} of them gave {estimate.k}) from "
                     f"{len(result.clusters)} clusters; the largest gap in merge heights would say {estimate.by_gap}")
    if result.plan is not None:
        lines.append(format_plan(result, result.plan))
    return "\n".join(lines)


def format_plan(result: Suggestions, plan: MergePlan) -> str:
    """The groups of the plan, each as ``into <- merged, ...``, and the modularity it reaches."""
    before = "each cluster in its coarse cluster" if plan.graph == HEADS else "the greedy merges alone"
    lines = [f"Plan down to {plan.target} groups ({plan.graph}-graph modularity {plan.modularity:.4f}; {before} "
             f"{plan.greedy_modularity:.4f}): merge into the first cluster of each line"]
    for group in plan.groups:
        total = sum(result.sizes[c] for c in group)
        merged = ", ".join(result.label(c) for c in group[1:]) or "(nothing)"
        lines.append(f"  {result.label(group[0])} ({total} images in all) <- {merged}")
    return "\n".join(lines)


COVER_TILE = 32  # pixels of each of the 2 x 2 cover images under a leaf


def cover_tile(paths: Sequence[str | Path]) -> np.ndarray:
    """Up to four images as a 2 x 2 mosaic of ``COVER_TILE`` pixel squares (white where there are fewer)."""
    from PIL import Image

    mosaic = Image.new("RGB", (2 * COVER_TILE, 2 * COVER_TILE), (255, 255, 255))
    for slot, path in enumerate(list(paths)[:4]):
        with Image.open(path) as picture:
            tile = picture.convert("RGB").resize((COVER_TILE, COVER_TILE), Image.Resampling.BICUBIC)
        mosaic.paste(tile, ((slot % 2) * COVER_TILE, (slot // 2) * COVER_TILE))
    return np.asarray(mosaic)


def draw_dendrogram(result: Suggestions, out: str | Path,
                    covers: Mapping[int, Sequence[str | Path]] | None = None) -> Path:
    """The hierarchy as a PNG: leaves named ``id name (size)``, the given images of each cluster as a small
    mosaic under its leaf, and the cut of the K estimate as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage
    from scipy.cluster.hierarchy import dendrogram

    m = len(result.clusters)
    figure, axis = plt.subplots(figsize=(max(6.0, 0.6 * m + 2), 5.0), dpi=100)
    tree = dendrogram(result.linkage, ax=axis, labels=[f"{result.label(c)} ({result.sizes[c]})"
                                                      for c in result.clusters],
                      leaf_rotation=90, leaf_font_size=8, color_threshold=_cut_height(result))
    heights = result.linkage[:, 2]
    axis.set_ylim(max(0.0, float(heights.min()) - 0.15 * float(np.ptp(heights)) - 0.02), float(heights.max()) * 1.02)
    axis.set_ylabel("1 - similarity")
    estimate = result.k_estimate
    title = f"{m} clusters, measure {result.measure}"
    if estimate is not None:
        axis.axhline(_cut_height(result), color="0.3", linestyle="--", linewidth=1)
        title += f": K estimate {estimate.k} (range {estimate.low}-{estimate.high})"
    axis.set_title(title, fontsize=10)
    if covers:
        for x, leaf in zip(range(5, 10 * m, 10), tree["leaves"], strict=True):
            paths = covers.get(result.clusters[leaf])
            if paths:
                box = AnnotationBbox(OffsetImage(cover_tile(paths), zoom=0.5), (x, 0), xybox=(0, -4),
                                     xycoords=("data", "axes fraction"), boxcoords="offset points", frameon=False,
                                     box_alignment=(0.5, 1.0))
                axis.add_artist(box)
        axis.tick_params(axis="x", pad=2 + COVER_TILE)
    out = Path(out)
    from twist_core.io_utils import atomic_write

    atomic_write(out, lambda tmp: figure.savefig(tmp, format="png", bbox_inches="tight"))  # a link is replaced
    plt.close(figure)
    return out


def _cut_height(result: Suggestions) -> float:
    """Midway between the merge heights on either side of the K estimate's cut (above the top when none)."""
    heights = np.concatenate([[0.0], result.linkage[:, 2], [result.linkage[-1, 2] * 1.05]])
    merges = len(result.clusters) - (result.k_estimate.k if result.k_estimate else 1)
    return float((heights[merges] + heights[merges + 1]) / 2)


def source_images(source: str | Path) -> tuple[Path, str | None, str | None, dict[int, str]]:
    """The image folder, the model file and its SHA-256 that an index (or labels table) was made with, and the
    path of each of its image ids (a table's ids are its usable rows, as :func:`data_from_table` numbers them)."""
    path = Path(source)
    if path.is_dir():
        store = MetaStore(meta_path(path))
        try:
            info, paths = store.info(), dict(store.all_paths())
        finally:
            store.close()
    else:
        from twist_core.index.build import load_labels

        rows, _, info = load_labels(path)
        paths = {i: row["path"] for i, row in enumerate(rows)}
    return Path(info["root"]), info.get("model"), info.get("model_sha256"), paths


def model_evidence(source: str | Path, data: ClusterData, measure: str, pairs: int = VIEW_PAIRS,
                   max_images: int = 20000, seed: int = 0, progress: bool = True) -> np.ndarray | list[np.ndarray]:
    """What ``measure`` reads from the model over the images of ``data`` (a seeded sample of ``max_images``
    beyond that), with the model and images ``source`` names: views, the joint of two views' clusters
    (:func:`~twist_core.curate.view_graph.view_graph`); heads, the coarse heads' shares
    (:func:`~twist_core.curate.view_graph.head_shares`)."""
    from twist_core.curate.view_graph import ViewGraphError, head_shares, open_model, view_graph

    root, model_path, sha, paths = source_images(source)
    if not model_path:
        raise MergeUserError(f"{source} does not name the model it was made with: index it again with --model M.onnx, "
                             "or use another measure")
    ids = data.ids
    if len(ids) > max_images:
        ids = np.sort(np.random.default_rng(seed).choice(ids, max_images, replace=False))
    images = [path_from_text(paths[int(i)]) for i in ids]
    try:
        model = open_model(model_path, sha)
        if measure == HEADS:
            return head_shares(model, root, images, progress)[0]
        return view_graph(model, root, images, pairs, seed, progress)[0]
    except ViewGraphError as error:
        raise MergeUserError(str(error)) from None


def run(config: MergesConfig) -> Suggestions:
    if config.top < 1 or config.bootstrap < 0 or config.max_queries < 1:
        raise MergeUserError("--top and --max-queries must be at least 1, --bootstrap at least 0")
    data = load_source(config.source, config.state_dir)
    found = None
    if config.measure in MODEL_GRAPHS:
        found = model_evidence(str(config.source), data, config.measure, config.view_pairs, config.max_queries,
                               config.seed)
    evidence = gather_evidence(data, config.measure, config.neighbours, config.max_queries, config.seed,
                               model_graph=found if config.measure == VIEWS else None,
                               coarse_shares=found if config.measure == HEADS else ())
    return suggest(data, config.measure, config.neighbours, config.max_queries, config.bootstrap, config.seed,
                   evidence=evidence, to=config.to)
