"""Does another graph of the images make a better label-free merge plan? Scored into merge.json.

``twist suggest-merges --to N`` links each image to its 10 nearest neighbours in the model's embedding and
groups the clusters so that the graph's modularity is highest. This bench keeps that grouping (greedy
agglomeration, then single clusters moved while modularity rises) and changes only the graph: shared-neighbour
weights (each link weighted by how many of the two lists overlap), mutual links only, the Hellinger similarity
of the top-10 probabilities instead of the embedding, the two concatenated, and k = 10 or 30. It also groups the
images themselves (Louvain communities of the embedding kNN graph, networkx) and maps each cluster to its
majority community. Labels are used only to score. Writes ``graph_variants`` of bench/results/merge.json
(with the K=10 result of ``other_seeds.NAME`` beside it, when bench/merge.py --another-seed NAME scored one).

    python -m bench.merge_graphs NAME OVER_RUN --data CIFAR_TEST [--work FOLDER]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
from scipy.sparse import csr_matrix

from bench.common import RESULTS, machine, save
from bench.merge_setup import index_classes, oracle_purity, planned_labels, prepare_index, recipe, score
from twist_core.curate import merges

LOUVAIN_RESOLUTIONS = (0.5, 0.7, 0.85, 1.0)


def plan_groups(graph: np.ndarray, target: int) -> np.ndarray:
    """The ``--to N`` grouping on any symmetric cluster graph: merge the pair whose union raises modularity
    most until ``target`` groups, then :func:`merges.refine_groups`. Returns each cluster's group."""
    graph = graph / graph.sum()
    groups = np.arange(len(graph))
    while groups.max() + 1 > target:
        member = np.eye(groups.max() + 1)[groups]
        inside = member.T @ graph @ member
        degree = inside.sum(axis=1)
        gain = inside - np.outer(degree, degree)
        np.fill_diagonal(gain, -np.inf)
        keep, gone = sorted(np.unravel_index(np.argmax(gain), gain.shape))
        groups[groups == gone] = keep
        groups = np.unique(groups, return_inverse=True)[1]
    return merges.refine_groups(graph, groups)


def top10_hellinger(data: merges.ClusterData, pos_of: np.ndarray, m: int) -> np.ndarray:
    """Unit vectors whose dot product is the Bhattacharyya coefficient of two images' top-10 probabilities."""
    probs = np.zeros((len(data.labels), m))
    for u in range(data.topk_clusters.shape[1]):
        ok = data.topk_clusters[:, u] >= 0
        probs[np.nonzero(ok)[0], pos_of[data.topk_clusters[ok, u]]] += data.topk_probs[ok, u]
    root = np.sqrt(probs)
    return root / np.linalg.norm(root, axis=1, keepdims=True)


def graph_scores(data: merges.ClusterData, classes: np.ndarray, names: list[str]) -> dict[str, Any]:
    clusters, _ = merges.current_clusters(data.labels)
    m, n, target = len(clusters), len(data.labels), len(names)
    pos_of = np.full(int(max(data.labels.max(), data.topk_clusters.max())) + 1, -1)
    pos_of[clusters] = np.arange(m)
    pos = pos_of[data.labels]

    def scored(groups: np.ndarray) -> dict[str, float]:
        return score(groups[pos], classes, names)

    def cluster_graph(rows: np.ndarray, cols: np.ndarray, weight: np.ndarray) -> np.ndarray:
        links = np.bincount(pos[rows] * m + pos[cols], weight, m * m).reshape(m, m)
        return links + links.T

    hell = top10_hellinger(data, pos_of, m)
    spaces = {"embedding": data.vectors, "hellinger_top10": hell,
              "embedding+hellinger": np.hstack([data.vectors, hell]) / np.sqrt(2)}
    out: dict[str, Any] = {}
    for space, vectors in spaces.items():
        for k in (10, 30):
            found = merges.nearest_neighbours(vectors, np.arange(n), k)
            rows, cols = np.repeat(np.arange(n), k), found.ravel()
            adjacency = csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
            weights = {"knn": np.ones(len(rows)),
                       "shared_neighbours": np.asarray((adjacency @ adjacency.T)[rows, cols]).ravel() / k,
                       "mutual": np.asarray(adjacency[cols, rows]).ravel()}
            for kind, weight in weights.items():
                out[f"{space}/{kind}/k{k}"] = scored(plan_groups(cluster_graph(rows, cols, weight), target))
                print(f"{space}/{kind}/k{k}", out[f"{space}/{kind}/k{k}"], flush=True)
    found = merges.nearest_neighbours(data.vectors, np.arange(n), 10)
    image_graph = nx.Graph()
    image_graph.add_edges_from((i, int(j)) for i, row in enumerate(found) for j in row)
    for resolution in LOUVAIN_RESOLUTIONS:
        community = np.zeros(n, dtype=int)
        for c, members in enumerate(nx.community.louvain_communities(image_graph, resolution=resolution, seed=0)):
            community[list(members)] = c
        groups = np.unique([np.bincount(community[pos == p]).argmax() for p in range(m)], return_inverse=True)[1]
        out[f"louvain[resolution={resolution}]"] = {"images": score(community, classes, names),
                                                    "clusters_to_majority": scored(groups)}
    return out


def summary(runs: dict[str, Any]) -> dict[str, Any]:
    """Each graph's ACC on every run scored so far, and its mean gain over the plan as shipped: a graph is
    worth shipping only if it gains on every run, not on the one it was found on."""
    out = {}
    for graph in next(iter(runs.values()))["graphs"]:
        if "acc" not in next(iter(runs.values()))["graphs"][graph]:
            continue
        gains = [entry["graphs"][graph]["acc"] - entry["plan_as_shipped"]["acc"] for entry in runs.values()]
        out[graph] = {"acc": {name: entry["graphs"][graph]["acc"] for name, entry in runs.items()},
                      "mean_gain_over_plan": round(float(np.mean(gains)), 4),
                      "gains_on_every_run": all(gain > 0 for gain in gains)}
    return dict(sorted(out.items(), key=lambda item: -item[1]["mean_gain_over_plan"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name")
    parser.add_argument("over_run")
    parser.add_argument("--data", required=True, help="cifar10-test class folders (scoring only)")
    parser.add_argument("--work", default="bench_work/merge")
    args = parser.parse_args()
    began = time.perf_counter()
    run = Path(args.over_run)
    index = prepare_index(run, Path(args.data), Path(args.work), args.name)
    data = merges.data_from_index(index)
    classes, names = index_classes(index, data)
    plan = merges.plan_merges(data, merges.gather_evidence(data, merges.DEFAULT_MEASURE), len(names))
    found = {"run": str(run.resolve()), "recipe": recipe(run),
             "plan_as_shipped": score(planned_labels(data, plan), classes, names),
             "ceiling": oracle_purity(data, classes, names), "graphs": graph_scores(data, classes, names),
             "machine": machine(), "seconds": round(time.perf_counter() - began, 1)}
    graphs = {key: value for key, value in found["graphs"].items() if "acc" in value}
    best = max(graphs, key=lambda key: graphs[key]["acc"])
    found["best_graph"] = {"graph": best, **graphs[best]}
    saved = json.loads((RESULTS / "merge.json").read_text())
    pair = saved.get("other_seeds", {}).get(args.name)
    if pair:  # the K=10 run of the same recipe and seed, scored by bench/merge.py --another-seed NAME
        found["k10_same_recipe"] = pair["k10"]
    saved.setdefault("graph_variants", {})[args.name] = found
    saved["graph_variants_summary"] = summary(saved["graph_variants"])
    print(json.dumps({k: found[k] for k in ("plan_as_shipped", "best_graph", "ceiling")}, indent=2))
    print(f"wrote {save('merge', saved)}")


if __name__ == "__main__":
    main()
