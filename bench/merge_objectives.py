"""Is the label-free merge plan short of K=10 because of the search or because of what it optimises?

Every plan of ``twist suggest-merges --to N`` maximises a label-free objective over groupings of whole clusters.
This bench takes each over-clustered index and, for four objectives, compares the plan the search finds with the
grouping the labels would make (every cluster into its majority class: the merge ceiling). If the search were
the limit, the labels' grouping would score higher on the objective than the plan found. If the objective is the
limit, it scores lower: the objective itself prefers a worse grouping, and no better search can close the gap.

Objectives (the view probabilities are 4 augmented view pairs per image, as ``--measure views`` draws them):
  - ``knn_modularity``: modularity of the kNN graph of the embeddings (the shipped default);
  - ``views_modularity``: modularity of the model's view graph (``--measure views``);
  - ``views_mutual_information``: I(group of view 1; group of view 2), IIC's objective, on the same joint;
  - ``twist``: TWIST's own loss on the group-summed view probabilities (a sample of 2,000 images), negated:
    diversity entropy minus the views' symmetric KL and the per-image entropy.
Each is planned by the shipped planner's search (greedy merges, then single clusters moved) on its own
objective. Labels are used only to score and to form the labels' grouping.
Writes ``merge_objectives`` and ``merge_objectives_summary`` of bench/results/merge.json.

``--representation`` asks the other half of the question: is the over-clustered backbone a better representation
than the K=10 one at all? For a pair of labels tables (K=10 and K=30 runs of one seed, with their embeddings) it
writes the leave-one-out 20-NN accuracy of the embeddings and the ACC / NMI of k-means (k = classes) on them into
``merge_representation``: what a re-clustering of the over-clustered embeddings could start from.

    python -m bench.merge_objectives NAME=INDEX [NAME=INDEX ...]   # indexes of K=30 runs (bench/merge.py made them)
    python -m bench.merge_objectives --representation NAME K10_LABELS.csv K30_LABELS.csv
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import RESULTS, machine, save
from bench.merge_setup import index_classes, score
from twist_core.curate import merges
from twist_core.curate.view_graph import open_model, view_probabilities
from twist_core.data.folder import ground_truth_labels
from twist_core.evaluation.metrics import kmeans_clusters, knn_accuracy
from twist_core.io_utils import path_from_text

PAIRS = 4
TWIST_SAMPLE = 2000
OBJECTIVES = ("knn_modularity", "views_modularity", "views_mutual_information", "twist")
Objective = Callable[[np.ndarray], float]  # groups (cluster -> group) -> value, higher is better


def all_view_probabilities(index: Path, data: merges.ClusterData, pairs: int = PAIRS, seed: int = 0) -> np.ndarray:
    """``(n, 2 * pairs, K)`` cluster probabilities of augmented views of every image of ``data``, drawn as
    ``--measure views`` draws them (:func:`twist_core.curate.view_graph.view_probabilities`)."""
    root, model_path, sha, paths = merges.source_images(index)
    model = open_model(model_path, sha)
    probs = np.concatenate(list(view_probabilities(model, root, [path_from_text(paths[int(i)]) for i in data.ids],
                                                   pairs, seed)))
    if len(probs) != len(data.ids):
        raise SystemExit(f"{index}: {len(data.ids) - len(probs)} images could not be read; the bench needs them all")
    return probs


def _entropy(p: np.ndarray) -> np.ndarray:
    return -np.sum(p * np.log(np.clip(p, 1e-12, None)), axis=-1)


def _member(groups: np.ndarray) -> np.ndarray:
    return np.eye(groups.max() + 1)[groups]


def mutual_information(joint: np.ndarray) -> Objective:
    def value(groups: np.ndarray) -> float:
        merged = _member(groups).T @ joint @ _member(groups)
        return float(2 * _entropy(merged.sum(axis=1)) - _entropy(merged.ravel()))
    return value


def twist_objective(probs: np.ndarray) -> Objective:
    def value(groups: np.ndarray) -> float:
        q = np.clip(probs @ _member(groups), 1e-8, 1.0)
        first, second = q[:, 0::2], q[:, 1::2]
        kl = np.mean(np.sum((first - second) * (np.log(first) - np.log(second)), axis=-1)) / 2
        return float(_entropy(q.reshape(-1, q.shape[-1]).mean(axis=0)) - kl - np.mean(_entropy(q)))
    return value


def modularity(graph: np.ndarray) -> Objective:
    return lambda groups: merges.group_modularity(graph, groups)


def greedy_then_moves(objective: Objective, clusters: int, target: int) -> np.ndarray:
    """Merge the pair of groups whose merge keeps the objective highest until ``target`` groups, then move single
    clusters between groups while the objective rises: the shipped planner's search, for any objective."""
    groups = np.arange(clusters)
    while groups.max() + 1 > target:
        candidates = []
        for a in range(groups.max() + 1):
            for b in range(a + 1, groups.max() + 1):
                merged = np.where(groups == b, a, groups)
                candidates.append(np.unique(merged, return_inverse=True)[1])
        groups = max(candidates, key=objective)
    best, moved = objective(groups), True
    while moved:
        moved = False
        for leaf in range(clusters):
            if np.count_nonzero(groups == groups[leaf]) == 1:
                continue
            for group in range(target):
                trial = groups.copy()
                trial[leaf] = group
                if (value := objective(trial)) > best + 1e-12:
                    groups, best, moved = trial, value, True
    return groups


def objectives_of(index: Path) -> dict[str, Any]:
    """Each objective's plan and the labels' grouping, scored and valued, on one over-clustered index."""
    data = merges.data_from_index(index)
    classes, names = index_classes(index, data)
    clusters, _ = merges.current_clusters(data.labels)
    target = len(names)
    position = {c: i for i, c in enumerate(clusters)}
    pos = np.array([position[int(c)] for c in data.labels])
    majority = np.array([np.bincount(classes[pos == i], minlength=target).argmax() for i in range(len(clusters))])
    by_labels = np.unique(majority, return_inverse=True)[1]

    probs = all_view_probabilities(index, data)
    probs = probs[:, :, clusters]  # columns in the order of ``clusters`` (all of them hold images here)
    joint = np.einsum("nvk,nvl->kl", probs[:, 0::2], probs[:, 1::2])
    joint = (joint + joint.T) / (2 * joint.sum())
    knn = merges.knn_links(merges.gather_evidence(data, merges.DEFAULT_MEASURE), pos, len(clusters),
                           np.ones(len(pos)))
    knn = (knn + knn.T) / (2 * knn.sum())
    sample = probs[np.random.default_rng(0).choice(len(probs), min(TWIST_SAMPLE, len(probs)), replace=False)]
    objectives = dict(zip(OBJECTIVES, (modularity(knn), modularity(joint), mutual_information(joint),
                                       twist_objective(sample)), strict=True))

    found: dict[str, Any] = {"labels_grouping": {**score(by_labels[pos], classes, names),
                                                 "groups": int(by_labels.max() + 1)}}
    for name, objective in objectives.items():
        groups = greedy_then_moves(objective, len(clusters), target)
        found[name] = {**score(groups[pos], classes, names), "objective": round(objective(groups), 5),
                       "objective_of_labels_grouping": round(objective(by_labels), 5)}
        found[name]["prefers_its_plan"] = found[name]["objective"] > found[name]["objective_of_labels_grouping"]
        print(f"{index.name} {name}: {found[name]}", flush=True)
    return found


def summary(runs: dict[str, Any]) -> dict[str, Any]:
    """Mean ACC / NMI of each objective's plan and of the labels' grouping, and on how many runs each objective
    values its own plan above the labels' grouping (all of them: the objective is the limit)."""
    def mean(part: str) -> dict[str, float]:
        return {k: round(float(np.mean([r[part][k] for r in runs.values()])), 4) for k in ("acc", "nmi")}

    out: dict[str, Any] = {"runs": list(runs), "labels_grouping": mean("labels_grouping")}
    for name in OBJECTIVES:
        out[name] = {**mean(name), "prefers_its_plan_on": sum(r[name]["prefers_its_plan"] for r in runs.values())}
    return out


def representation(table: Path) -> dict[str, Any]:
    """20-NN accuracy and k-means (k = classes) ACC / NMI of the embeddings of one labels table."""
    from twist_core.label.table import load_labels

    rows, embeddings, _ = load_labels(table)
    names, classes = ground_truth_labels([row["path"] for row in rows])
    vectors = np.asarray(embeddings, np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True).clip(min=1e-12)
    return {"knn20_acc": round(knn_accuracy(vectors, classes), 4),
            "kmeans": score(kmeans_clusters(vectors, len(names)), classes, names), "images": len(rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("indexes", nargs="*", help="NAME=INDEX of over-clustered runs' indexes")
    parser.add_argument("--representation", nargs=3, metavar=("NAME", "K10_LABELS", "K30_LABELS"))
    args = parser.parse_args()
    saved = json.loads((RESULTS / "merge.json").read_text())
    if args.representation:
        name, k10, k30 = args.representation
        found = {"k10": representation(Path(k10)), "k30": representation(Path(k30)), "machine": machine()}
        saved.setdefault("merge_representation", {})[name] = found
        print(json.dumps(found, indent=2))
        print(f"wrote {save('merge', saved)}")
        return
    section = saved.setdefault("merge_objectives", {})
    for item in args.indexes:
        name, _, index = item.partition("=")
        began = time.perf_counter()
        section[name] = {"index": str(Path(index).resolve()), **objectives_of(Path(index)), "view_pairs": PAIRS,
                         "machine": machine(), "seconds": round(time.perf_counter() - began, 1)}
        saved["merge_objectives_summary"] = summary(section)
        save("merge", saved)  # after every run: a killed bench keeps what it finished
    print(json.dumps(saved["merge_objectives_summary"], indent=2))


if __name__ == "__main__":
    main()
