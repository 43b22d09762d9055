"""Training curves as a PNG, drawn headless (Agg) from the per-epoch metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_training_curves(history: list[dict[str, Any]], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from twist_core.io_utils import atomic_write

    trained = [row for row in history if "loss" in row]
    epochs = [row["epoch"] for row in trained]
    figure, axes = plt.subplots(2, 2, figsize=(11, 7))
    loss_axis, cluster_axis, lr_axis, eval_axis = axes.flat
    for name in ("loss", "consistency", "sharpness", "diversity", "self_label"):
        points = [(row["epoch"], row[name]) for row in trained if name in row]
        if points:
            loss_axis.plot(*zip(*points, strict=True), label=name)
    loss_axis.set_title("loss and its parts")
    loss_axis.legend(fontsize=8)
    cluster_axis.plot(epochs, [row["clusters_in_use"] for row in trained], color="tab:green")
    cluster_axis.set_title("clusters in use")
    lr_axis.plot(epochs, [row["lr"] for row in trained], color="tab:red")
    lr_axis.set_title("learning rate")
    evals = [(row["epoch"], row["eval"]) for row in history if row.get("eval")]
    if evals:
        for name, label in (("acc", "head ACC"), ("nmi", "head NMI"), ("kmeans_acc", "k-means on embedding ACC"),
                            ("knn_acc", "kNN on embedding (ceiling)")):
            points = [(e, m[name]) for e, m in evals if name in m]
            if points:
                eval_axis.plot(*zip(*points, strict=True), marker="o", label=label)
        eval_axis.legend(fontsize=8)
        eval_axis.set_title("evaluation")
    else:
        entropy = [row["mean_entropy"] / max(row["max_entropy"], 1e-12) for row in trained]
        eval_axis.plot(epochs, entropy, color="tab:purple")
        eval_axis.set_title("entropy of the mean prediction / log K")
    for axis in axes.flat:
        axis.set_xlabel("epoch")
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=90))
    plt.close(figure)
