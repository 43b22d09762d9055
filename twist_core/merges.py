"""``twist suggest-merges INDEX``: which clusters of an over-clustered model belong together, and how many there are.

Train with more clusters than you expect, index the folder, then ask which pairs to merge. Two clusters are
alike when the images of one have their nearest neighbours in the other (the kNN cross-link rate of the
embedding graph, the default; ``--measure topk`` uses the probability mass an image shares between its top
clusters, ``centroid`` the cosine between cluster means). A scipy average-linkage hierarchy over
``1 - similarity`` gives the dendrogram, and the largest gap between successive merge heights gives an
estimate of the number of groups, with a range from a bootstrap over the images.

Input: an index folder of ``twist index`` (with ``--state-dir`` the app's curation is respected: merges,
moves and exclusions), or a labels table of ``twist label`` (its .embeddings.npy beside it). A training run
folder has no embeddings of your images: export, label and index it first.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from scipy.cluster.hierarchy import linkage
from scipy.sparse import coo_matrix
from scipy.spatial.distance import squareform

from twist_core.config import build_config, command_parser, option
from twist_core.index_store import INDEX_FILE, MANIFEST, META_FILE, IndexUserError, MetaStore, read_manifest
from twist_core.io_utils import atomic_write_text

MEASURES = ("knn", "topk", "centroid")
LINKAGE_METHOD = "average"
RANGE_QUANTILES = (0.05, 0.95)


class MergeUserError(Exception):
    """A problem the user can fix (wrong input, too few clusters); the message says which."""


@dataclass
class MergesConfig:
    source: str | None = option(None, "index folder of twist index (or a labels table of twist label); a "
                                "training run must be exported, labelled and indexed first")
    state_dir: str | None = option(None, "the app's --state-dir: suggest over the curated clusters (its merges, "
                                   "moves and exclusions applied)")
    measure: str = option("knn", "similarity of two clusters: knn = share of nearest-neighbour links between "
                          "them, topk = probability mass their images share, centroid = cosine of the means",
                          choices=list(MEASURES))
    neighbours: int = option(10, "neighbours per image in the kNN graph (measure knn)")
    max_queries: int = option(20000, "images whose neighbours are searched (a random sample beyond this)")
    top: int = option(15, "ranked pairs to print")
    bootstrap: int = option(200, "bootstrap resamples of the images for the range of the K estimate (0: none)")
    seed: int = option(0, "seed of the query sample and the bootstrap")
    json: str | None = option(None, "also write pairs, hierarchy and K estimate to this JSON file")
    plot: str | None = option(None, "also draw the dendrogram to this PNG file")


@dataclass(frozen=True)
class ClusterData:
    """What the measures need, one row per image: its current cluster, unit embedding and top clusters."""

    labels: np.ndarray  # (n,) current cluster of each image
    vectors: np.ndarray  # (n, d) unit embeddings
    topk_clusters: np.ndarray  # (n, t) most probable clusters (mapped through merges), -1 where absent
    topk_probs: np.ndarray  # (n, t)
    names: dict[int, str]


@dataclass(frozen=True)
class KEstimate:
    """The number of groups the hierarchy suggests, and how sure that is."""

    k: int
    low: int
    high: int
    support: float  # share of bootstrap resamples that gave exactly ``k``
    candidates: list[tuple[int, float]]  # (k, gap) best first
    resamples: int

    def as_dict(self) -> dict[str, Any]:
        return {"k": self.k, "range": [self.low, self.high], "support": round(self.support, 3),
                "candidates": [{"k": k, "gap": round(g, 6)} for k, g in self.candidates[:5]],
                "resamples": self.resamples,
                "method": f"largest gap between successive {LINKAGE_METHOD}-linkage merge heights (at least one "
                          "merge, at least two groups); range: 5th-95th percentile over bootstrap resamples of "
                          "the images"}


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
                "k_estimate": self.k_estimate.as_dict() if self.k_estimate else None}


# ---- the evidence each measure is computed from (once), then weighed per image (bootstrap)
@dataclass(frozen=True)
class Evidence:
    """Per-image evidence: the measure re-weighs it for each resample without searching again."""

    measure: str
    queries: np.ndarray  # positions of the images whose neighbours were searched (knn)
    neighbours: np.ndarray  # (len(queries), k) positions of their neighbours (knn)


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
                    seed: int = 0) -> Evidence:
    if measure not in MEASURES:
        raise MergeUserError(f"unknown measure {measure!r}; choose one of {', '.join(MEASURES)}")
    n = len(data.labels)
    if measure != "knn":
        return Evidence(measure, np.zeros(0, np.int64), np.zeros((0, 0), np.int64))
    if neighbours < 1:
        raise MergeUserError("--neighbours must be at least 1")
    queries = np.arange(n)
    if n > max_queries > 0:
        queries = np.sort(np.random.default_rng(seed).choice(n, max_queries, replace=False))
    return Evidence(measure, queries, nearest_neighbours(data.vectors, queries, neighbours))


def _pair_rate(links: np.ndarray, mass: np.ndarray) -> np.ndarray:
    """Symmetric link rate ``(L_ab + L_ba) / (mass_a + mass_b)`` (0 where both clusters are empty)."""
    both = links + links.T
    total = mass[:, None] + mass[None, :]
    return np.divide(both, total, out=np.zeros_like(both), where=total > 0)


def _knn_similarity(evidence: Evidence, pos: np.ndarray, m: int, weights: np.ndarray) -> np.ndarray:
    k = evidence.neighbours.shape[1]
    a = np.repeat(pos[evidence.queries], k)
    b = pos[evidence.neighbours].ravel()
    w = np.repeat(weights[evidence.queries], k)
    links = np.bincount(a * m + b, w, m * m).reshape(m, m)
    return _pair_rate(links, np.bincount(pos[evidence.queries], weights[evidence.queries], m) * k)


def merged_topk(clusters: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image, each cluster's total probability among its top entries (entries merged into one cluster add
    up); repeated entries and absent ones (-1) become -1."""
    same = (clusters[:, :, None] == clusters[:, None, :]) & (clusters[:, :, None] >= 0)
    total = (same * probs[:, None, :]).sum(axis=2)
    t = clusters.shape[1]
    earlier = np.tril(np.ones((t, t), bool), -1)  # entry u has the same cluster as an earlier entry v < u
    repeated = (same & earlier[None]).any(axis=2)
    return np.where(repeated | (clusters < 0), -1, clusters), total


def _topk_similarity(data: ClusterData, pos_of: np.ndarray, pos: np.ndarray, m: int,
                     weights: np.ndarray) -> np.ndarray:
    mapped = np.where(data.topk_clusters >= 0, pos_of[np.clip(data.topk_clusters, 0, None)], -1)
    clusters, totals = merged_topk(mapped, data.topk_probs)
    links = np.zeros(m * m)
    t = clusters.shape[1]
    for u in range(t):
        for v in range(u + 1, t):
            ok = (clusters[:, u] >= 0) & (clusters[:, v] >= 0)
            shared = np.minimum(totals[ok, u], totals[ok, v]) * weights[ok]
            links += np.bincount(clusters[ok, u] * m + clusters[ok, v], shared, m * m)
    return 2 * _pair_rate(links.reshape(m, m), np.bincount(pos, weights, m))


def _centroid_similarity(data: ClusterData, pos: np.ndarray, m: int, weights: np.ndarray) -> np.ndarray:
    member = coo_matrix((weights, (pos, np.arange(len(pos)))), shape=(m, len(pos))).tocsr()
    sums = np.asarray(member @ data.vectors)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    means = np.divide(sums, norms, out=np.zeros_like(sums), where=norms > 0)
    return means @ means.T


def similarity(data: ClusterData, evidence: Evidence, clusters: Sequence[int], labels: np.ndarray | None = None,
               weights: np.ndarray | None = None) -> np.ndarray:
    """``m x m`` similarity in [0, 1] of ``clusters`` (images labelled by ``labels``, default ``data.labels``)."""
    labels = data.labels if labels is None else labels
    weights = np.ones(len(labels)) if weights is None else weights
    m = len(clusters)
    pos_of = np.full(max(int(labels.max()), int(data.topk_clusters.max(initial=0)), max(clusters)) + 1, -1)
    pos_of[list(clusters)] = np.arange(m)
    pos = pos_of[labels]
    if evidence.measure == "knn":
        result = _knn_similarity(evidence, pos, m, weights)
    elif evidence.measure == "topk":
        result = _topk_similarity(data, pos_of, pos, m, weights)
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


def gap_candidates(heights: np.ndarray) -> list[tuple[int, float]]:
    """Cuts ranked by the gap to the next merge: cutting after ``j`` merges (1 <= j <= m-2) leaves ``m - j``
    groups. The cut before any merge is left out: the tool assumes you trained with more clusters than groups."""
    m = len(heights) + 1
    if m < 3:
        return []
    gaps = np.diff(heights)  # gaps[j - 1]: from merge j to merge j + 1
    order = np.argsort(-gaps, kind="stable")
    return [(int(m - (j + 1)), float(gaps[j])) for j in order]


def estimate_k(data: ClusterData, evidence: Evidence, clusters: Sequence[int], link: np.ndarray,
               resamples: int, seed: int) -> KEstimate | None:
    """The largest-gap K of ``link`` and its bootstrap range (images drawn with replacement, Poisson weights)."""
    candidates = gap_candidates(link[:, 2])
    if not candidates:
        return None
    rng = np.random.default_rng(seed)
    found = []
    for _ in range(resamples):
        weights = rng.poisson(1.0, len(data.labels)).astype(np.float64)
        resampled = gap_candidates(hierarchy(similarity(data, evidence, clusters, weights=weights))[:, 2])
        found.append(resampled[0][0])
    k = candidates[0][0]
    if not found:
        return KEstimate(k, k, k, 1.0, candidates, 0)
    low, high = (int(q) for q in np.quantile(found, RANGE_QUANTILES, method="nearest"))
    return KEstimate(k, min(low, k), max(high, k), float(np.mean(np.array(found) == k)), candidates, len(found))


def ranked_pairs(sim: np.ndarray, clusters: Sequence[int]) -> list[tuple[int, int, float]]:
    upper = np.triu_indices(len(clusters), 1)
    order = np.argsort(-sim[upper], kind="stable")
    return [(clusters[upper[0][i]], clusters[upper[1][i]], float(sim[upper][i])) for i in order]


def current_clusters(labels: np.ndarray) -> tuple[list[int], dict[int, int]]:
    values, counts = np.unique(labels, return_counts=True)
    return [int(v) for v in values], {int(v): int(c) for v, c in zip(values, counts, strict=True)}


def suggest(data: ClusterData, measure: str = "knn", neighbours: int = 10, max_queries: int = 20000,
            resamples: int = 200, seed: int = 0, evidence: Evidence | None = None) -> Suggestions:
    """Ranked merge suggestions, the hierarchy and the K estimate over the clusters of ``data``."""
    clusters, sizes = current_clusters(data.labels)
    if len(clusters) < 2:
        raise MergeUserError(f"only {len(clusters)} cluster holds images: there is nothing to merge")
    evidence = evidence or gather_evidence(data, measure, neighbours, max_queries, seed)
    sim = similarity(data, evidence, clusters)
    link = hierarchy(sim)
    k_estimate = estimate_k(data, evidence, clusters, link, resamples, seed)
    return Suggestions(evidence.measure, clusters, sizes, data.names, sim, link, ranked_pairs(sim, clusters),
                       k_estimate)


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


def cluster_data(labels: np.ndarray, vectors: np.ndarray, topk: Sequence[str | None], names: Mapping[int, str],
                 merged_into: Mapping[int, int] | None = None) -> ClusterData:
    """Rows of current labels, embeddings and top-k JSON (``[[cluster, prob], ...]``); ``merged_into`` maps
    the model's clusters to where curation merged them."""
    width = max((len(json.loads(t)) for t in topk if t), default=1)
    clusters, probs = _parse_topk(topk, width)
    if merged_into:
        lookup = np.arange(max(int(clusters.max(initial=0)), max(merged_into)) + 1)
        for source, into in merged_into.items():
            lookup[source] = into
        clusters = np.where(clusters >= 0, lookup[np.clip(clusters, 0, None)], -1)
    return ClusterData(np.asarray(labels, np.int64), _unit(vectors), clusters, probs, dict(names))


def _index_names(store: MetaStore) -> dict[int, str]:
    return {int(c["cluster"]): c["name"] or f"cluster {c['cluster']}" for c in store.cluster_summary()
            if c["cluster"] is not None}


def data_from_index(index_dir: Path, state_dir: Path | None = None) -> ClusterData:
    """Embeddings and top-k of an index; with the app's state folder, its curated labels (excluded images
    left out)."""
    manifest = read_manifest(index_dir)
    folder = index_dir / manifest["dir"]
    store = MetaStore(folder / META_FILE)
    try:
        names = _index_names(store)
        ids = store.all_ids()
        rows = store.rows(ids.tolist())
    finally:
        store.close()
    cpu_index = faiss.read_index(str(folder / INDEX_FILE))
    vectors = cpu_index.reconstruct_batch(ids) if len(ids) else np.zeros((0, cpu_index.d), np.float32)
    labels = {int(i): rows[int(i)]["cluster"] for i in ids}
    merged: dict[int, int] = {}
    if state_dir is not None:
        labels, names, merged = curated_labels(state_dir, folder / META_FILE, names)
    keep = np.array([labels.get(int(i)) is not None and labels[int(i)] >= 0 for i in ids], dtype=bool)
    kept = ids[keep]
    return cluster_data(np.array([labels[int(i)] for i in kept], np.int64), vectors[keep],
                        [rows[int(i)]["topk"] for i in kept], names, merged)


def curated_labels(state_dir: Path, meta_path: Path, names: dict[int, str]
                   ) -> tuple[dict[int, int | None], dict[int, str], dict[int, int]]:
    """The app's curation of this index: label per image id, cluster names, and where each cluster went."""
    from app.curation import CurationError, CurationStore

    path = Path(state_dir) / "curation.sqlite"
    if not path.is_file():
        raise MergeUserError(f"no curation.sqlite in {state_dir}: give the folder the app was started with "
                             "(--state-dir), or leave the option out")
    default = [names.get(c, f"cluster {c}") for c in range(max(names, default=-1) + 1)]
    try:
        store = CurationStore(path, meta_path, default)
    except CurationError as error:
        raise MergeUserError(str(error)) from None
    try:
        labels = {r.id: r.label for r in store.iter_records()}
        merged = {c: store.merged_into(c) for c in range(len(default))}
        return labels, store.names(), {c: t for c, t in merged.items() if c != t}
    finally:
        store.close()


def data_from_table(table: Path) -> ClusterData:
    """Labels, embeddings and top-k of a ``twist label`` table (rows that failed to label left out)."""
    from twist_core.index_build import load_labels

    rows, embeddings, _ = load_labels(table)
    names = {int(r["cluster"]): r["cluster_name"] or f"cluster {r['cluster']}" for r in rows}
    return cluster_data(np.array([r["cluster"] for r in rows], np.int64), np.asarray(embeddings),
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
    if path.is_dir() and (path / "config.json").is_file():
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
        lines.append(f"K estimate: needs at least 3 clusters (there are {len(result.clusters)})")
    else:
        others = ", ".join(str(k) for k, _ in estimate.candidates[1:3])
        lines.append(f"K estimate: {estimate.k} (range {estimate.low}-{estimate.high} over {estimate.resamples} "
                     f"bootstrap resamples, {estimate.support:.0%} of them gave {estimate.k}; next best cuts: "
                     f"{others or '-'}) from {len(result.clusters)} clusters")
    return "\n".join(lines)


def draw_dendrogram(result: Suggestions, out: str | Path, covers: Mapping[int, str | Path] | None = None) -> Path:
    """The hierarchy as a PNG: leaves named ``id name (size)``, a cover image under each leaf when given, and
    the cut of the K estimate as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage
    from PIL import Image
    from scipy.cluster.hierarchy import dendrogram

    m = len(result.clusters)
    figure, axis = plt.subplots(figsize=(max(6.0, 0.55 * m + 2), 5.5 if covers else 4.5), dpi=100)
    tree = dendrogram(result.linkage, ax=axis, labels=[f"{result.label(c)} ({result.sizes[c]})"
                                                      for c in result.clusters],
                      leaf_rotation=90, leaf_font_size=8, color_threshold=_cut_height(result))
    axis.set_ylabel("1 - similarity")
    estimate = result.k_estimate
    title = f"{m} clusters, measure {result.measure}"
    if estimate is not None:
        axis.axhline(_cut_height(result), color="0.3", linestyle="--", linewidth=1)
        title += f": K estimate {estimate.k} (range {estimate.low}-{estimate.high})"
    axis.set_title(title, fontsize=10)
    if covers:
        for x, leaf in zip(range(5, 10 * m, 10), tree["leaves"], strict=True):
            path = covers.get(result.clusters[leaf])
            if path is None:
                continue
            with Image.open(path) as picture:
                thumb = np.asarray(picture.convert("RGB").resize((48, 48)))
            box = AnnotationBbox(OffsetImage(thumb, zoom=0.5), (x, 0), xybox=(0, -14), xycoords="data",
                                 boxcoords="offset points", frameon=False, box_alignment=(0.5, 1.0))
            axis.add_artist(box)
        axis.tick_params(axis="x", pad=30)
    figure.tight_layout()
    out = Path(out)
    figure.savefig(out, format="png")
    plt.close(figure)
    return out


def _cut_height(result: Suggestions) -> float:
    """Midway between the merge heights on either side of the K estimate's cut (above the top when none)."""
    heights = result.linkage[:, 2]
    if result.k_estimate is None:
        return float(heights.max()) + 1.0
    merges = len(result.clusters) - result.k_estimate.k
    return float((heights[merges - 1] + heights[merges]) / 2)


def build_parser() -> argparse.ArgumentParser:
    return command_parser("twist suggest-merges", __doc__, MergesConfig, positional=("source",))


def run(config: MergesConfig) -> Suggestions:
    if config.top < 1 or config.bootstrap < 0 or config.max_queries < 1:
        raise MergeUserError("--top and --max-queries must be at least 1, --bootstrap at least 0")
    data = load_source(config.source, config.state_dir)
    return suggest(data, config.measure, config.neighbours, config.max_queries, config.bootstrap, config.seed)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = build_config(MergesConfig, args, args.config)
        result = run(config)
        if config.json:
            atomic_write_text(config.json, json.dumps({"source": str(config.source), **result.as_dict()},
                                                      indent=2) + "\n")
        if config.plot:
            draw_dendrogram(result, config.plot)
    except (MergeUserError, IndexUserError, ValueError, OSError) as error:
        print(f"twist suggest-merges: error: {error}", file=sys.stderr)
        return 2
    print(format_suggestions(result, config.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
