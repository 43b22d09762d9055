"""The suggestions as text and as a dendrogram picture."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from twist_core.curate.merges.options import HEADS
from twist_core.curate.merges.plan import MergePlan, Suggestions


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
