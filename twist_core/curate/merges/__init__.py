"""``twist suggest-merges INDEX``: which clusters of an over-clustered model belong together, and how many there are.

Train with more clusters than you expect, index the folder, then ask which pairs to merge. Two clusters are
alike when the images of one have their nearest neighbours in the other: by default a pair ranks by how much
merging it would raise the modularity of the kNN graph of the embeddings (links between the two beyond what
their sizes predict); ``--measure views`` uses how often the model itself puts two augmented views of an image
into the two clusters (it runs the index's model on the images again: ``--view-pairs`` pairs per image),
``heads`` how much the two
share the clusters of the model's coarse heads (a model trained with ``--coarse-classes``; one pass over the
images), which is the measure to use when the model has them. A scipy
average-linkage hierarchy over ``1 - similarity`` gives the dendrogram; the cut of it whose groups make the
kNN graph most modular estimates the number of groups, with a range from a bootstrap over the images.
``--to N`` also prints a plan down to N groups: the greedy merges, then single clusters moved between groups
while that raises the modularity (whole clusters only, so the app can apply it merge by merge).

Input: an index folder of ``twist index`` (with ``--state-dir`` the app's curation is respected: merges,
moves and exclusions), or a labels table of ``twist label`` (its .embeddings.npy beside it). A training run
folder has no embeddings of your images: export, label and index it first.

The package: ``options`` (the command's options and measures), ``data`` (what the measures read), ``measures``
(the evidence and the similarity of two clusters), ``plan`` (hierarchy, K estimate, plan) and ``report`` (text
and dendrogram). Its API is imported from here: ``from twist_core.curate import merges``.
"""

from __future__ import annotations

from twist_core.curate.merges.data import ClusterData, cluster_data, data_from_index, data_from_table, source_images
from twist_core.curate.merges.measures import (
    Evidence,
    gather_evidence,
    graph_by_cluster,
    heads_graph,
    knn_links,
    model_evidence,
    nearest_neighbours,
    positions,
    register_measure,
    similarity,
)
from twist_core.curate.merges.options import (
    DEFAULT_MEASURE,
    HEADS,
    MEASURES,
    VIEW_PAIRS,
    VIEWS,
    MergesConfig,
    MergeUserError,
)
from twist_core.curate.merges.plan import (
    MergePlan,
    Suggestions,
    current_clusters,
    greedy_merges,
    group_modularity,
    plan_merges,
    refine_groups,
    run,
    suggest,
)
from twist_core.curate.merges.report import draw_dendrogram, format_plan, format_suggestions

__all__ = [
    "DEFAULT_MEASURE",
    "HEADS",
    "MEASURES",
    "VIEWS",
    "VIEW_PAIRS",
    "ClusterData",
    "Evidence",
    "MergePlan",
    "MergeUserError",
    "MergesConfig",
    "Suggestions",
    "cluster_data",
    "current_clusters",
    "data_from_index",
    "data_from_table",
    "draw_dendrogram",
    "format_plan",
    "format_suggestions",
    "gather_evidence",
    "graph_by_cluster",
    "greedy_merges",
    "group_modularity",
    "heads_graph",
    "knn_links",
    "model_evidence",
    "nearest_neighbours",
    "plan_merges",
    "positions",
    "refine_groups",
    "register_measure",
    "run",
    "similarity",
    "source_images",
    "suggest",
]
