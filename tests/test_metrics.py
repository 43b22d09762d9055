"""Cluster metrics against hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest

from twist_core.evaluation.metrics import cluster_report, contingency, hungarian_accuracy, knn_accuracy

NAMES = ["a", "b", "c"]


def test_perfect_clustering_with_permuted_ids_scores_one() -> None:
    classes = np.array([0, 0, 1, 1, 2, 2, 2])
    clusters = np.array([2, 2, 0, 0, 1, 1, 1])
    report = cluster_report(clusters, classes, 3, NAMES)
    assert report["acc"] == 1.0 and report["nmi"] == pytest.approx(1.0) and report["ari"] == pytest.approx(1.0)
    assert [row["majority_class"] for row in report["per_cluster"]] == ["b", "c", "a"]
    assert all(row["purity"] == 1.0 for row in report["per_cluster"])


def test_more_clusters_than_classes_counts_unmatched_clusters_as_errors() -> None:
    classes = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    clusters = np.array([0, 0, 1, 1, 2, 2, 3, 3])  # each class split in two clusters
    report = cluster_report(clusters, classes, 4, ["x", "y"])
    assert report["acc"] == pytest.approx(0.5)  # two of four clusters can be matched
    assert report["purity"] == 1.0


def test_fewer_clusters_and_empty_clusters() -> None:
    classes = np.array([0, 1, 2, 0, 1, 2])
    clusters = np.array([0, 0, 0, 0, 0, 0])  # everything in cluster 0, clusters 1-4 empty
    report = cluster_report(clusters, classes, 5, NAMES)
    assert report["acc"] == pytest.approx(2 / 6)
    assert report["clusters_in_use"] == 1
    assert report["per_cluster"][3] == {"cluster": 3, "size": 0, "purity": 0.0, "majority_class": None,
                                        "matched_class": None}


def test_contingency_and_hungarian_against_brute_force() -> None:
    rng = np.random.default_rng(0)
    classes, clusters = rng.integers(0, 4, 500), rng.integers(0, 4, 500)
    table = contingency(clusters, classes, 4, 4)
    brute = np.zeros((4, 4), dtype=int)
    for k, c in zip(clusters, classes, strict=True):
        brute[k, c] += 1
    assert (table == brute).all()
    from itertools import permutations

    best = max(sum(brute[k, p[k]] for k in range(4)) for p in permutations(range(4)))
    assert hungarian_accuracy(table)[0] == pytest.approx(best / 500)


def test_knn_accuracy_leaves_the_query_out() -> None:
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 16)) * 5
    labels = np.repeat(np.arange(3), 30)
    points = centres[labels] + rng.normal(size=(90, 16))
    assert knn_accuracy(points, labels, k=5) == 1.0
    # Each point alone in its own class: with itself left out, no neighbour can share its label.
    assert knn_accuracy(points, np.arange(90), k=1) == 0.0
