"""A 2-D map of the embeddings (PCA of a fixed random subsample), computed once and cached beside the store.

The cache file is named after the index generation, so an updated index gets a fresh map. Labels are not
cached: the app joins the current curated labels at request time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from twist_core.io_utils import atomic_write

MAX_POINTS = 5000


def pca_2d(vectors: np.ndarray) -> np.ndarray:
    """The first two principal components (SVD of the centred data), sign-fixed so reruns agree."""
    centred = vectors.astype(np.float64) - vectors.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    axes = vt[:2]
    axes *= np.sign(axes[np.arange(len(axes)), np.abs(axes).argmax(axis=1)])[:, None]
    return (centred @ axes.T).astype(np.float32)


def load_or_compute(cache: Path, ids: Sequence[int], vector: Callable[[int], np.ndarray],
                    max_points: int = MAX_POINTS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(ids, N x 2 coordinates) of at most ``max_points`` images, from ``cache`` when it is there."""
    if cache.is_file():
        with np.load(cache) as data:
            return data["ids"], data["xy"]
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) > max_points:
        ids = np.sort(np.random.default_rng(seed).choice(ids, max_points, replace=False))
    if len(ids) < 3:
        return ids, np.zeros((len(ids), 2), np.float32)
    xy = pca_2d(np.stack([vector(int(i)) for i in ids]))
    cache.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, ids=ids, xy=xy)

    atomic_write(cache, write)
    return ids, xy
