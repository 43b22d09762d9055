"""``twist eval RUN_OR_MODEL DATA``: how well the discovered clusters match the true classes of a class-folder tree.

Reports ACC/NMI/AMI/ARI, per-cluster size/purity/majority class, kNN accuracy of the embeddings, and two
baselines on the same images (k-means on the embeddings, k-means on raw pixels), plus a confusion PNG.
The same functions evaluate the model in memory during training (``twist train --eval-data``).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from twist_core.config import AutoConfig, option
from twist_core.data.dataset import FolderImages, decode_all
from twist_core.data.folder import DEFAULT_MAX_PIXELS, NoImagesError, ground_truth_labels, require_images
from twist_core.data.preprocess import centre_crop_normalise, decode_size
from twist_core.evaluation.metrics import (
    cluster_report,
    expected_calibration_error,
    hungarian_accuracy,
    kmeans_clusters,
    knn_accuracy,
    nearest_neighbours,
    neighbour_disagreement,
)
from twist_core.io_utils import atomic_write_text
from twist_core.model.network import TwistModel

PIXEL_BASELINE_SIZE = 32


@dataclass
class EvalConfig(AutoConfig):
    source: str = option(None, "a run folder (uses RUN/last.pt) or an exported .onnx model")
    data: str = option(None, "class-folder tree: first-level subfolder names are the true classes")
    json: str | None = option(None, "write the full report (metrics, per-cluster table, baselines) to this file")
    confusion: str | None = option(None, "confusion-matrix PNG (default: beside --json, or RUN/eval_confusion.png)")
    knn_k: int = option(20, "k of the leave-one-out kNN accuracy (cosine)")
    baselines: bool = option(True, "also run k-means on the embeddings and on raw pixels")
    batch_size: int = option(256, "images per inference batch")
    workers: int = option(2, "decoding worker processes")
    device: str = option("auto", "auto, cpu or cuda (run folders only; ONNX chooses its own provider)")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "refuse images with more pixels than this")
    seed: int = option(0, "seed of the k-means baselines")


@dataclass
class EvalImages:
    """A labelled folder decoded once: uint8 images at the preprocessing resize size, and their classes."""

    images: torch.Tensor
    labels: np.ndarray
    class_names: list[str]
    files: list[str]
    failures: dict[int, str]


def load_eval_images(root: str | Path, image_size: int, workers: int = 2, max_pixels: int = DEFAULT_MAX_PIXELS,
                     progress: bool = True, resize_size: int | None = None) -> EvalImages:
    """The labelled images decoded to ``resize_size`` (default: the contract's for ``image_size``)."""
    files = require_images(root)
    class_names, labels = ground_truth_labels(files)
    if len(class_names) < 2 or "" in class_names:
        raise NoImagesError(f"{root}: evaluation needs images in class subfolders (DATA/<class>/image), "
                            f"found {len(class_names)} class folder(s)")
    resize_size = resize_size or decode_size(image_size)
    images, failures = decode_all(FolderImages(root, files, resize_size, max_pixels), workers, progress)
    keep = np.array([i not in failures for i in range(len(files))])
    return EvalImages(images[torch.from_numpy(keep)], labels[keep], class_names,
                      [f for f, k in zip(files, keep, strict=True) if k], failures)


@torch.no_grad()
def predict_torch(model: TwistModel, images: torch.Tensor, crop: int, device: torch.device,
                  batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and embeddings in eval mode (BN running statistics), as the exported model computes them."""
    was_training = model.training
    model.eval()
    probs, embeddings = [], []
    for start in range(0, len(images), batch_size):
        batch = centre_crop_normalise(images[start:start + batch_size].to(device), crop)
        embedding, p = model.probabilities(batch.contiguous(memory_format=torch.channels_last))
        probs.append(p.float().cpu())
        embeddings.append(embedding.float().cpu())
    model.train(was_training)
    return torch.cat(probs).numpy(), torch.cat(embeddings).numpy()


def pixel_features(images: torch.Tensor) -> np.ndarray:
    """Raw pixels at 32 x 32, the classic clustering baseline's input."""
    small = F.interpolate(images.float(), size=(PIXEL_BASELINE_SIZE, PIXEL_BASELINE_SIZE), mode="bilinear",
                          antialias=True, align_corners=False)
    return (small.flatten(1) / 255.0).numpy()


def score(probs: np.ndarray, embeddings: np.ndarray, data: EvalImages, knn_k: int = 20,
          baselines: bool = False, seed: int = 0, embedding_kmeans: bool = False) -> dict[str, Any]:
    """The full report for predictions on ``data`` (same order).

    Beside the head's scores: the kNN accuracy of its embedding (a ceiling, it uses the labels), the expected
    calibration error of its confidence, and the share of images whose cluster disagrees with most of their
    neighbours. ``embedding_kmeans`` adds k-means on the embedding alone (``kmeans_acc``/``kmeans_nmi``), the
    figure the head should at least match; ``baselines`` adds that and k-means on pixels under ``baselines``.
    """
    n_clusters = probs.shape[1]
    clusters = probs.argmax(1)
    report = cluster_report(clusters, data.labels, n_clusters, data.class_names)
    neighbours = nearest_neighbours(embeddings, knn_k)
    report["knn_acc"] = knn_accuracy(embeddings, data.labels, knn_k, neighbours)
    report["knn_k"] = knn_k
    report["mean_confidence"] = float(probs.max(1).mean())
    _, mapping = hungarian_accuracy(np.asarray(report["contingency"]))
    report["ece"] = expected_calibration_error(probs, clusters, data.labels, mapping)
    report["neighbour_disagreement"] = neighbour_disagreement(embeddings, clusters, knn_k, neighbours)
    report["classes"] = data.class_names
    report["n_clusters"] = n_clusters
    report["skipped"] = len(data.failures)
    features = {}
    if baselines or embedding_kmeans:
        features["kmeans_embeddings"] = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True).clip(min=1e-12)
    if baselines:
        features["kmeans_pixels"] = pixel_features(data.images)
    found = {name: cluster_report(kmeans_clusters(values, n_clusters, seed), data.labels, n_clusters,
                                  data.class_names) for name, values in features.items()}
    if baselines:
        report["baselines"] = {name: {m: summary[m] for m in ("acc", "nmi", "ami", "ari")}
                               for name, summary in found.items()}
    if "kmeans_embeddings" in found:
        report["kmeans_acc"], report["kmeans_nmi"] = (found["kmeans_embeddings"][m] for m in ("acc", "nmi"))
    return report


def summary_line(report: dict[str, Any]) -> str:
    """The head's scores, then what its embedding knows: k-means on it (when computed) and the kNN ceiling."""
    line = " ".join(f"{name.upper()} {report[name]:.3f}" for name in ("acc", "nmi", "ami", "ari"))
    if "kmeans_acc" in report:
        line += f" | k-means on the embedding ACC {report['kmeans_acc']:.3f} NMI {report['kmeans_nmi']:.3f}"
    line += f" | kNN {report['knn_acc']:.3f}"
    if "ece" in report:
        line += f" | ECE {report['ece']:.3f}, off-neighbours {report['neighbour_disagreement']:.3f}"
    return line


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{report['n_images']} images, {len(report['classes'])} classes, {report['n_clusters']} clusters "
             f"({report['clusters_in_use']} in use), {report['skipped']} unreadable skipped",
             "", f"{'':<22}{'ACC':>7}{'NMI':>7}{'AMI':>7}{'ARI':>7}",
             f"{'TWIST':<22}" + "".join(f"{report[m]:>7.3f}" for m in ("acc", "nmi", "ami", "ari"))]
    for name, values in report.get("baselines", {}).items():
        label = name.replace("kmeans_", "k-means on ")
        lines.append(f"{label:<22}" + "".join(f"{values[m]:>7.3f}" for m in ("acc", "nmi", "ami", "ari")))
    lines += [f"kNN accuracy (k={report['knn_k']}, cosine, leave-one-out): {report['knn_acc']:.3f}",
              f"mean confidence: {report['mean_confidence']:.3f}, expected calibration error: {report['ece']:.3f}",
              f"images whose cluster disagrees with most of their {report['knn_k']} neighbours: "
              f"{report['neighbour_disagreement']:.3f}", "",
              f"{'cluster':>7} {'size':>7} {'purity':>7}  majority class"]
    for row in sorted(report["per_cluster"], key=lambda r: -r["size"]):
        lines.append(f"{row['cluster']:>7} {row['size']:>7} {row['purity']:>7.3f}  {row['majority_class'] or '-'}")
    return "\n".join(lines)


def plot_confusion(report: dict[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from twist_core.io_utils import atomic_write

    table = np.array(report["contingency"], dtype=np.float64)
    order = np.argsort(table.argmax(1) * table.shape[0] - table.max(1))  # clusters grouped by majority class
    table = table[order]
    figure, axis = plt.subplots(figsize=(1.2 + 0.5 * table.shape[1], 1.2 + 0.35 * min(table.shape[0], 60)))
    axis.imshow(table / table.sum(1, keepdims=True).clip(min=1), cmap="Blues", aspect="auto")
    axis.set_xticks(range(len(report["classes"])), report["classes"], rotation=60, ha="right", fontsize=8)
    axis.set_yticks(range(len(order)), [str(k) for k in order], fontsize=7)
    axis.set_xlabel("true class")
    axis.set_ylabel("cluster")
    axis.set_title(f"ACC {report['acc']:.3f}  NMI {report['nmi']:.3f}  ARI {report['ari']:.3f}")
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=90))
    plt.close(figure)


def _predict_source(config: EvalConfig) -> tuple[np.ndarray, np.ndarray, EvalImages]:
    source = Path(config.source)
    progress = sys.stderr.isatty()
    if source.suffix == ".onnx":
        from twist_core.deploy.infer import OnnxModel

        onnx_model = OnnxModel(source, device=config.device)
        transform = onnx_model.transform
        data = load_eval_images(config.data, transform.input_size, config.workers, config.max_pixels, progress,
                                transform.resize_size)
        batches = [centre_crop_normalise(data.images[i:i + config.batch_size], transform.input_size).numpy()
                   for i in range(0, len(data.images), config.batch_size)]
        outputs = [onnx_model.predict_arrays(batch) for batch in batches]
        return np.concatenate([o[0] for o in outputs]), np.concatenate([o[1] for o in outputs]), data
    from twist_core.distributed import pick_device
    from twist_core.model.checkpoint import load_checkpoint
    from twist_core.model.network import checkpoint_spec

    checkpoint = load_checkpoint(source)
    spec = checkpoint_spec(checkpoint)
    model = TwistModel(spec)
    model.load_state_dict(checkpoint["model"])
    device = pick_device(config.device)
    model.to(device).to(memory_format=torch.channels_last)
    data = load_eval_images(config.data, spec.input_size, config.workers, config.max_pixels, progress,
                            spec.resize_size)
    probs, embeddings = predict_torch(model, data.images, spec.input_size, device, config.batch_size)
    return probs, embeddings, data


def confusion_path(config: EvalConfig) -> str | None:
    """Where the confusion matrix goes: --confusion, else beside --json, else into a run folder."""
    if config.confusion is not None:
        return config.confusion
    return (str(Path(config.json).with_suffix(".png")) if config.json
            else str(Path(config.source) / "eval_confusion.png") if Path(config.source).is_dir() else None)


def evaluate(config: EvalConfig) -> dict[str, Any]:
    started = time.perf_counter()
    probs, embeddings, data = _predict_source(config)
    report = score(probs, embeddings, data, config.knn_k, config.baselines, config.seed)
    report["source"] = str(config.source)
    report["data"] = str(Path(config.data).resolve())
    report["seconds"] = time.perf_counter() - started
    if config.json:
        atomic_write_text(config.json, json.dumps(report, indent=2) + "\n")
    confusion = confusion_path(config)
    if confusion:
        plot_confusion(report, confusion)
        report["confusion_png"] = confusion
    return report
