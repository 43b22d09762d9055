"""The hierarchy over the clusters, the K estimate from its most modular cut, and the plan down to N groups."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.cluster.hierarchy import cut_tree, linkage
from scipy.spatial.distance import squareform

from twist_core.curate.merges.data import ClusterData, load_source
from twist_core.curate.merges.measures import (
    Evidence,
    cluster_model_graph,
    gather_evidence,
    image_weights,
    knn_links,
    model_evidence,
    positions,
    scaled_gain,
    similarity,
)
from twist_core.curate.merges.options import (
    DEFAULT_MEASURE,
    HEADS,
    LINKAGE_METHOD,
    MODEL_GRAPHS,
    RANGE_QUANTILES,
    VIEWS,
    MergesConfig,
    MergeUserError,
)


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
    pos, m = positions(data, clusters, data.labels)[1:], len(clusters)
    quality = modularity_of_cuts(knn_links(evidence, pos[0], m, image_weights(data, weights)), link)
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
    links = cluster_model_graph(data, evidence, clusters, data.labels)
    graph = (links + links.T) / max(2 * links.sum(), 1e-12)
    following = group_modularity(graph, groups)
    while groups.max() + 1 > target:
        member = np.eye(groups.max() + 1)[groups]
        gain = scaled_gain(member.T @ graph @ member)
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
        links = cluster_model_graph(data, evidence, clusters, data.labels)
    else:
        links = knn_links(evidence, positions(data, clusters, data.labels)[1], len(clusters),
                          np.ones(len(data.labels)))
    graph = (links + links.T) / max(2 * links.sum(), 1e-12)
    greedy = np.unique([merged[data.labels == c][0] for c in clusters], return_inverse=True)[1]
    groups = refine_groups(graph, greedy)
    return _as_plan(target, clusters, sizes, groups, graph, group_modularity(graph, greedy),
                    "view" if evidence.measure == VIEWS else "kNN")


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
