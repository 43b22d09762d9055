"""Cluster-quality metrics against ground truth: ACC (Hungarian), NMI, AMI, ARI, purity, kNN accuracy.

K (clusters) may differ from C (true classes): ACC matches at most min(K, C) cluster-class pairs, and every
image in an unmatched cluster counts as an error.
"""

from __future__ import annotations

import numpy as np

# scipy and scikit-learn are imported where they are used: together about a second per process, which a training
# run without --eval-data and every quick CLI error would otherwise pay.


def contingency(clusters: np.ndarray, true_classes: np.ndarray, n_clusters: int, n_classes: int) -> np.ndarray:
    """K x C table of counts, built with one bincount (no Python loop over cells)."""
    flat = clusters.astype(np.int64) * n_classes + true_classes.astype(np.int64)
    return np.bincount(flat, minlength=n_clusters * n_classes).reshape(n_clusters, n_classes)


def hungarian_accuracy(table: np.ndarray) -> tuple[float, dict[int, int]]:
    """Best one-to-one cluster->class matching; returns accuracy and the mapping."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(table, maximize=True)
    total = table.sum()
    return (float(table[rows, cols].sum() / total) if total else 0.0), dict(zip(rows.tolist(), cols.tolist(),
                                                                                  strict=True))


def cluster_report(clusters: np.ndarray, true_classes: np.ndarray, n_clusters: int,
                   class_names: list[str]) -> dict:
    """ACC/NMI/AMI/ARI plus per-cluster size, purity and majority class."""
    from sklearn import metrics as skm

    table = contingency(clusters, true_classes, n_clusters, len(class_names))
    acc, mapping = hungarian_accuracy(table)
    sizes = table.sum(1)
    per_cluster = []
    for k in range(n_clusters):
        majority = int(table[k].argmax())
        per_cluster.append({"cluster": k, "size": int(sizes[k]),
                            "purity": float(table[k, majority] / sizes[k]) if sizes[k] else 0.0,
                            "majority_class": class_names[majority] if sizes[k] else None,
                            "matched_class": class_names[mapping[k]] if k in mapping else None})
    return {
        "acc": acc,
        "nmi": float(skm.normalized_mutual_info_score(true_classes, clusters)),
        "ami": float(skm.adjusted_mutual_info_score(true_classes, clusters)),
        "ari": float(skm.adjusted_rand_score(true_classes, clusters)),
        "purity": float(table.max(1).sum() / max(1, table.sum())),
        "n_images": len(clusters),
        "clusters_in_use": int((sizes > 0).sum()),
        "per_cluster": per_cluster,
        "contingency": table.tolist(),
    }


def nearest_neighbours(embeddings: np.ndarray, k: int = 20, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` most similar other rows by cosine (n x k indices and similarities, unordered)."""
    vectors = embeddings.astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True).clip(min=1e-12)
    n = len(vectors)
    k = max(0, min(k, n - 1))
    indices, similarities = np.zeros((n, k), np.int64), np.zeros((n, k), np.float32)
    if k < 1:
        return indices, similarities
    for start in range(0, n, chunk):
        similarity = vectors[start:start + chunk] @ vectors.T
        rows = np.arange(similarity.shape[0])
        similarity[rows, start + rows] = -np.inf  # leave the query itself out
        found = np.argpartition(-similarity, k, axis=1)[:, :k]
        indices[start:start + len(rows)] = found
        similarities[start:start + len(rows)] = np.take_along_axis(similarity, found, 1)
    return indices, similarities


def knn_accuracy(embeddings: np.ndarray, labels: np.ndarray, k: int = 20,
                 neighbours: tuple[np.ndarray, np.ndarray] | None = None) -> float:
    """Leave-one-out k-nearest-neighbour accuracy with cosine similarity (majority vote, ties by similarity).

    ``neighbours``: the result of ``nearest_neighbours(embeddings, k)`` when already computed."""
    indices, similarities = neighbours if neighbours is not None else nearest_neighbours(embeddings, k)
    if indices.shape[1] < 1:
        return 0.0
    rows = np.arange(len(indices))
    votes = np.zeros((len(indices), int(labels.max()) + 1))
    np.add.at(votes, (rows[:, None], labels[indices]), 1.0 + 1e-3 * similarities)  # similarity only breaks ties
    return float((votes.argmax(1) == labels).mean())


def neighbour_disagreement(embeddings: np.ndarray, clusters: np.ndarray, k: int = 20,
                           neighbours: tuple[np.ndarray, np.ndarray] | None = None) -> float:
    """Share of images whose cluster is not the most common cluster among their ``k`` nearest neighbours (cosine).

    Needs no labels: where it is high, the head splits what the embedding keeps together (a confident image whose
    neighbours all sit in another cluster is the typical mistake it counts).
    """
    indices, _ = neighbours if neighbours is not None else nearest_neighbours(embeddings, k)
    if indices.shape[1] < 1:
        return 0.0
    rows = np.arange(len(indices))
    votes = np.zeros((len(indices), int(clusters.max()) + 1))
    np.add.at(votes, (rows[:, None], clusters[indices]), 1.0)
    return float((votes[rows, clusters] < votes.max(1)).mean())


def expected_calibration_error(probs: np.ndarray, clusters: np.ndarray, true_classes: np.ndarray,
                               mapping: dict[int, int], bins: int = 15) -> float:
    """ECE of the head's confidence: an image counts as right when its cluster is matched (Hungarian) to its class.

    The gap between mean confidence and accuracy in each of ``bins`` equal confidence bins, weighted by the bin's
    share of the images: 0 when a confidence of 0.9 is right 90 % of the time.
    """
    confidence = probs.max(1)
    matched = np.array([mapping.get(int(c), -1) for c in range(probs.shape[1])])
    correct = matched[clusters] == true_classes
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            error += inside.mean() * abs(confidence[inside].mean() - correct[inside].mean())
    return float(error)


def kmeans_clusters(features: np.ndarray, n_clusters: int, seed: int = 0) -> np.ndarray:
    """k-means baseline (mini-batch for large sets, so a baseline never dominates the evaluation time)."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    features = features.astype(np.float32)
    if len(features) > 20_000:
        model = MiniBatchKMeans(n_clusters=n_clusters, random_state=seed, n_init=3, batch_size=4096)
    else:
        model = KMeans(n_clusters=n_clusters, random_state=seed, n_init=3)
    return model.fit_predict(features)
