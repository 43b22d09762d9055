"""A 2-D map of the embeddings (PCA of a fixed random subsample), computed once and cached beside the store.

The cache file is named after the index generation, so an updated index gets a fresh map. Labels are not
cached: the app joins the current curated labels at request time. The map is drawn as a picture whose
geometry is known exactly (:class:`MapGeometry`), so a click on any pixel resolves to the nearest point.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from twist_core.io_utils import atomic_write

MAX_POINTS = 5000
MAP_WIDTH, MAP_HEIGHT = 960, 640  # pixels of the drawn map
PLOT_BOX = (0.01, 0.01, 0.78, 0.98)  # left, bottom, width, height of the plot area, in figure fractions
MAX_LEGEND = 24  # more clusters than this: no legend (a click names the cluster anyway)


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


@dataclass(frozen=True)
class MapGeometry:
    """Where data coordinates land on the drawn map, in image pixels (origin top left, as browsers click)."""

    x_range: tuple[float, float]
    y_range: tuple[float, float]
    width: int = MAP_WIDTH
    height: int = MAP_HEIGHT

    @classmethod
    def around(cls, xy: np.ndarray) -> MapGeometry:
        """Data bounds with a 3 % margin, so no point sits on the edge."""
        if len(xy) == 0:
            return cls((-1.0, 1.0), (-1.0, 1.0))
        low, high = xy.min(axis=0).astype(float), xy.max(axis=0).astype(float)
        pad = np.maximum((high - low) * 0.03, 1e-6)
        return cls((low[0] - pad[0], high[0] + pad[0]), (low[1] - pad[1], high[1] + pad[1]))

    def to_pixels(self, xy: np.ndarray) -> np.ndarray:
        left, bottom, box_w, box_h = PLOT_BOX
        fx = (xy[:, 0] - self.x_range[0]) / (self.x_range[1] - self.x_range[0])
        fy = (xy[:, 1] - self.y_range[0]) / (self.y_range[1] - self.y_range[0])
        px = (left + fx * box_w) * self.width
        py = (1.0 - (bottom + fy * box_h)) * self.height
        return np.stack([px, py], axis=1)

    def nearest(self, xy: np.ndarray, pixel: tuple[float, float], radius: float = 20.0) -> int | None:
        """Row of the point drawn closest to ``pixel``, or None when none lies within ``radius`` pixels."""
        if len(xy) == 0:
            return None
        distance = np.hypot(*(self.to_pixels(xy) - np.asarray(pixel, dtype=float)).T)
        row = int(distance.argmin())
        return row if distance[row] <= radius else None


def draw_map(xy: np.ndarray, clusters: Sequence[int], names: Mapping[int, str], geometry: MapGeometry) -> np.ndarray:
    """The map as an RGB array of exactly ``geometry``'s size, one colour per cluster.

    A cluster's colour and place in the legend follow its number, not its name: a rename used to reorder the
    legend and change every colour.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dpi = 100
    figure = plt.figure(figsize=(geometry.width / dpi, geometry.height / dpi), dpi=dpi)
    try:
        axes = figure.add_axes(PLOT_BOX)
        shown = sorted(set(int(c) for c in clusters))
        colours = plt.get_cmap("tab20" if max(shown, default=0) >= 10 else "tab10")
        cluster_array = np.asarray(clusters)
        for cluster in shown:
            chosen = cluster_array == cluster
            colour = "0.6" if cluster < 0 else colours(cluster % colours.N)  # excluded images grey, never a cluster's
            axes.scatter(xy[chosen, 0], xy[chosen, 1], s=6, color=colour, linewidths=0,
                         label=names.get(cluster, f"cluster {cluster}"))
        axes.set_xlim(*geometry.x_range)
        axes.set_ylim(*geometry.y_range)
        axes.set_xticks([])
        axes.set_yticks([])
        if 0 < len(shown) <= MAX_LEGEND:
            figure.legend(loc="center right", fontsize=8, markerscale=2.5, frameon=False)
        figure.canvas.draw()
        return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    finally:
        plt.close(figure)
