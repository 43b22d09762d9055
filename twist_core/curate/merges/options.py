"""The options of ``twist suggest-merges`` and the measures it offers."""

from __future__ import annotations

from dataclasses import dataclass

from twist_core.config import AutoConfig, option
from twist_core.errors import UserError

VIEW_PAIRS = 4  # two forward passes per image each; the pairs bench/merge_views.py measured
MEASURES = ("modularity",)  # from the index alone; the ones the guide's table rejected live in the bench
VIEWS = "views"  # these two also need the model and the images (twist_core.curate.view_graph)
HEADS = "heads"
MODEL_GRAPHS = (VIEWS, HEADS)  # measures whose evidence is a graph of the model's clusters
DEFAULT_MEASURE = "modularity"
LINKAGE_METHOD = "average"
RANGE_QUANTILES = (0.05, 0.95)


class MergeUserError(UserError):
    """A problem the user can fix (wrong input, too few clusters); the message says which."""


@dataclass
class MergesConfig(AutoConfig):
    source: str | None = option(None, "index folder of twist index (or a labels table of twist label); a "
                                "training run must be exported, labelled and indexed first")
    state_dir: str | None = option(None, "the app's --state-dir: suggest over the curated clusters (its merges, "
                                   "moves and exclusions applied)")
    measure: str = option(DEFAULT_MEASURE, "similarity of two clusters: modularity = how much merging them "
                          "raises the modularity of the kNN graph (links beyond what their sizes predict), "
                          "views = how often the model puts two augmented views "
                          "of one image into the two (runs the index's model on the images again), heads = how "
                          "much their images share the clusters of the model's coarse heads (a model trained with "
                          "--coarse-classes; the measure to use for such a model)",
                          choices=[*MEASURES, *MODEL_GRAPHS])
    view_pairs: int = option(VIEW_PAIRS, "measure views: augmented view pairs per image (two forward passes "
                                              "each)")
    neighbours: int = option(10, "neighbours per image in the kNN graph (modularity and the K estimate)")
    max_queries: int = option(20000, "images whose neighbours are searched, and (measure views) whose views are run "
                                     "(a random sample beyond this)")
    top: int = option(15, "ranked pairs to print")
    bootstrap: int = option(200, "bootstrap resamples of the images for the range of the K estimate (0: none)")
    seed: int = option(0, "seed of the query sample and the bootstrap")
    json: str | None = option(None, "also write pairs, hierarchy and K estimate to this JSON file")
    plot: str | None = option(None, "also draw the dendrogram to this PNG file")
    to: int | None = option(None, "also plan merges down to this many groups: greedy merges of the top "
                            "suggestion, then single clusters moved between groups while the kNN graph's "
                            "modularity rises")
