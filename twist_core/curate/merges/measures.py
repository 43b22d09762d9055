"""How alike two clusters are: the evidence each measure is computed from once (the kNN graph, the model's
cluster graph), then weighed per image for each bootstrap resample."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from twist_core.curate.merges.data import ClusterData, source_images
from twist_core.curate.merges.options import HEADS, MODEL_GRAPHS, VIEW_PAIRS, VIEWS, MergeUserError
from twist_core.io_utils import path_from_text


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
    if measure not in SIMILARITIES:
        raise MergeUserError(f"unknown measure {measure!r}; choose one of {', '.join(SIMILARITIES)}")
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


def cluster_model_graph(data: ClusterData, evidence: Evidence, clusters: Sequence[int], labels: np.ndarray
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


def knn_links(evidence: Evidence, pos: np.ndarray, m: int, weights: np.ndarray) -> np.ndarray:
    """``m x m`` weighted counts of kNN edges from images of cluster a (position) to images of cluster b."""
    k = evidence.neighbours.shape[1]
    a = np.repeat(pos[evidence.queries], k)
    b = pos[evidence.neighbours].ravel()
    w = np.repeat(weights[evidence.queries], k)
    return np.bincount(a * m + b, w, m * m).reshape(m, m)



def modularity_similarity(data: ClusterData, evidence: Evidence, clusters: Sequence[int], labels: np.ndarray,
                          weights: np.ndarray) -> np.ndarray:
    """How much merging two clusters would change the modularity of the kNN graph (links between them beyond what
    their degrees predict: ``e_ab - a_a a_b``), scaled to [0, 1] over the pairs: the best pair is 1, the worst 0.

    Near the end every merge lowers modularity; the scaling keeps the least harmful pair first."""
    _, pos = positions(data, clusters, labels)
    return scaled_gain(knn_links(evidence, pos, len(clusters), weights))


def model_graph_similarity(data: ClusterData, evidence: Evidence, clusters: Sequence[int], labels: np.ndarray,
                           weights: np.ndarray) -> np.ndarray:
    """Measures views and heads: the modularity gain of merging two clusters in the model's own cluster graph."""
    return scaled_gain(cluster_model_graph(data, evidence, clusters, labels))


def scaled_gain(graph: np.ndarray) -> np.ndarray:
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



def image_weights(data: ClusterData, weights: np.ndarray | None) -> np.ndarray:
    return np.ones(len(data.labels)) if weights is None else weights



def positions(data: ClusterData, clusters: Sequence[int], labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cluster id -> position in ``clusters`` (-1 for any other id), and each image's position."""
    pos_of = np.full(max(int(labels.max()), int(data.topk_clusters.max(initial=0)), max(clusters)) + 1, -1)
    pos_of[list(clusters)] = np.arange(len(clusters))
    return pos_of, pos_of[labels]



Similarity = Callable[[ClusterData, Evidence, Sequence[int], np.ndarray, np.ndarray], np.ndarray]
# measure -> the ``m x m`` similarity of ``clusters`` from (data, evidence, clusters, image labels, image weights)
SIMILARITIES: dict[str, Similarity] = {"modularity": modularity_similarity, VIEWS: model_graph_similarity,
                                       HEADS: model_graph_similarity}


def register_measure(name: str, measure: Similarity) -> None:
    """Offer another measure to :func:`gather_evidence` and :func:`similarity` (the bench compares, with these,
    the measures the guide's table rejected)."""
    SIMILARITIES[name] = measure


def similarity(data: ClusterData, evidence: Evidence, clusters: Sequence[int], labels: np.ndarray | None = None,
               weights: np.ndarray | None = None) -> np.ndarray:
    """``m x m`` similarity in [0, 1] of ``clusters`` (images labelled by ``labels``, default ``data.labels``)."""
    labels = data.labels if labels is None else labels
    result = SIMILARITIES[evidence.measure](data, evidence, clusters, labels, image_weights(data, weights))
    result = np.clip(result, 0.0, 1.0)
    np.fill_diagonal(result, 1.0)
    return result


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
