"""What the merge benchmarks share: an over-clustered run exported, labelled and indexed once, each image's
true class read back for scoring, and the scores (ACC / NMI / ARI) of a labelling; ``bench.merge``,
``bench.merge_graphs``, ``bench.merge_objectives``, ``bench.merge_selftrain`` and ``bench.merge_views`` use it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from twist_core.curate import merges
from twist_core.data.folder import ground_truth_labels
from twist_core.evaluation.metrics import cluster_report
from twist_core.layout import CONFIG_FILE, MANIFEST, METRICS_FILE


def prepare_index(run: Path, data: Path, work: Path, name: str) -> Path:
    """Export, label (top 10) and index ``run`` on ``data`` into ``work/name_*`` unless already there."""
    from twist_core.deploy.export import ExportConfig, export_model
    from twist_core.index.build import IndexConfig, build_index
    from twist_core.label.labeller import LabelConfig, label_folder

    index = work / f"{name}_index"
    if (index / MANIFEST).is_file():
        return index
    model = export_model(ExportConfig(run=str(run), out=str(work / f"{name}.onnx")))
    labels = work / f"{name}_labels.csv"
    label_folder(LabelConfig(model=str(model), folder=str(data), out=str(labels), topk=10, overwrite=True,
                             progress=False))
    build_index(IndexConfig(source=str(labels), model=str(model), out=str(index), device="cpu"))
    return index


def index_classes(index: Path, data: merges.ClusterData) -> tuple[np.ndarray, list[str]]:
    """The true class (first folder) of every image of ``data``, read from the index by id: scoring only."""
    from twist_core.index.image_index import IndexReader

    index_reader = IndexReader.open(index, "cpu")
    try:
        paths = index_reader.paths_by_id()
    finally:
        index_reader.close()
    names, classes = ground_truth_labels([paths[int(i)] for i in data.ids])
    return classes, names


def score(labels: np.ndarray, classes: np.ndarray, class_names: list[str]) -> dict[str, float]:
    values, dense = np.unique(labels, return_inverse=True)
    report = cluster_report(dense, classes, len(values), class_names)
    return {"acc": round(report["acc"], 4), "nmi": round(report["nmi"], 4), "ari": round(report["ari"], 4),
            "clusters": len(values)}


def oracle_purity(data: merges.ClusterData, classes: np.ndarray, class_names: list[str]) -> dict[str, float]:
    """Upper bound that USES the labels: every cluster merged into its majority class."""
    clusters = np.unique(data.labels)
    majority = {int(c): int(np.bincount(classes[data.labels == c], minlength=len(class_names)).argmax())
                for c in clusters}
    return score(np.array([majority[int(c)] for c in data.labels]), classes, class_names)


def trained_classes(run: Path) -> int:
    return int(json.loads((run / CONFIG_FILE).read_text())["classes"])


def recipe(run: Path) -> dict[str, Any]:
    """What a run was trained with, so that a pair in the JSON says which recipe it compares."""
    config = json.loads((run / CONFIG_FILE).read_text())
    last = json.loads((run / METRICS_FILE).read_text().splitlines()[-1])
    return {"backbone": config["backbone"], "seed": config["seed"], "time_budget": config["time_budget"],
            "epochs_trained": last["epoch"], "self_label_fraction": config["self_label_fraction"]}


def planned_labels(data: merges.ClusterData, plan: merges.MergePlan) -> np.ndarray:
    """Each image's cluster once ``plan`` is applied."""
    into = {source: target for source, target in plan.merges}
    return np.array([into.get(int(c), int(c)) for c in data.labels], np.int64)
