"""Which clusters the model itself puts together: the evidence of ``twist suggest-merges --measure views|heads``.

TWIST trains the two augmented views of an image to land in the same cluster. On a model with more clusters than
classes, the disagreements left over are mostly between clusters that split one class, so the joint distribution
of the clusters of two views (``sum_i p(view 1 of i) p(view 2 of i)^T``, IIC's joint) is a cluster graph that
needs no embeddings. Planning on its modularity beat the kNN graph of the embeddings on most over-clustered
cifar10-test runs and lost on the digits (guide section 6; bench/results/merge.json, ``view_graph*``), so it is an
option. It needs
the model and the images, which an index names, and costs two forward passes per image and view pair.

A model trained with ``--coarse-classes`` says it more directly: its coarse heads cluster the same layer more
coarsely, so two fine clusters whose images the heads put into the same coarse clusters belong together
(:func:`head_shares`, one forward pass per image).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from twist_core.data.augment import BatchAugment, policy_for_size
from twist_core.data.dataset import DecodedCrops, collate
from twist_core.deploy.infer import OnnxModel
from twist_core.errors import UserError
from twist_core.io_utils import file_sha256

BATCH = 256


class ViewGraphError(UserError):
    """The model or the images the view graph needs are missing or unusable; the message says which."""


def decoded_crops(model: OnnxModel, root: Path, paths: Sequence[str]) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Per batch, the positions in ``paths`` of the images that decode and their uint8 N x H x W x 3 crops
    (labelling's decoding: an unreadable image is left out of the evidence, as labelling leaves it out)."""
    batches = DataLoader(DecodedCrops(root, list(paths), model.transform), batch_size=BATCH, collate_fn=collate)
    for positions, crops, errors in batches:
        if len(crops):
            yield [i for i, error in zip(positions, errors, strict=True) if not error], crops


def view_probabilities(model: OnnxModel, root: Path, paths: Sequence[str], pairs: int,
                       seed: int = 0) -> Iterator[np.ndarray]:
    """Per batch of the images that decode, ``(n, 2 * pairs, K)`` cluster probabilities of their augmented view
    pairs (pair ``i`` in columns ``2i`` and ``2i + 1``). The views are the training crops (0.4-1 of the image),
    jitter, greyscale and (above 64 px) blur, drawn from a seeded generator so they are reproducible."""
    if pairs < 1:
        raise ViewGraphError("--view-pairs must be at least 1")
    augment = BatchAugment(policy_for_size(model.transform.input_size, fixed_stem=True))
    generator = torch.Generator().manual_seed(seed)
    for _, crops in decoded_crops(model, root, paths):
        images = crops.permute(0, 3, 1, 2).contiguous()
        views = []
        for _ in range(pairs):
            first, second = augment(images, generator)[:2]
            views += [model.predict_arrays(first.numpy())[0], model.predict_arrays(second.numpy())[0]]
        yield np.stack(views, 1).astype(np.float64)


def view_graph(model: OnnxModel, root: Path, paths: Sequence[str], pairs: int, seed: int = 0,
               progress: bool = True) -> tuple[np.ndarray, int]:
    """``K x K`` symmetric joint of the model's clusters over ``pairs`` augmented view pairs of each image
    (:func:`view_probabilities`), summing to 1, and how many images went into it."""
    joint = np.zeros((model.n_classes, model.n_classes))
    used, start = 0, time.monotonic()
    for views in view_probabilities(model, root, paths, pairs, seed):
        for pair in range(pairs):
            joint += views[:, 2 * pair].T @ views[:, 2 * pair + 1]
        used += len(views)
        if progress:
            _show_progress("view graph", used, len(paths), start)
    _check_used("view graph", used, len(paths), root, progress)
    joint = (joint + joint.T) / 2
    return joint / joint.sum(), used


def head_shares(model: OnnxModel, root: Path, paths: Sequence[str], progress: bool = True
                ) -> tuple[list[np.ndarray], int]:
    """Per coarse head, ``S = sum_i p(i) q(i)^T``: how much probability mass each of the model's clusters shares
    with each coarse cluster over the images (K x coarse K, summing to the images used), and how many images
    went into it (one clean pass, labelling's crops)."""
    if not model.coarse_classes:
        raise ViewGraphError(f"{model.path} has no coarse heads: train with --coarse-classes (e.g. --classes 30 "
                             "--coarse-classes 10), export and index again, or use another --measure")
    shares = [np.zeros((model.n_classes, k)) for k in model.coarse_classes]
    used, start = 0, time.monotonic()
    for _, crops in decoded_crops(model, root, paths):
        probs, coarse = model.predict_heads(model.transform.normalize(crops.numpy()))
        for share, head in zip(shares, coarse, strict=True):
            share += probs.astype(np.float64).T @ head.astype(np.float64)
        used += len(crops)
        if progress:
            _show_progress("coarse heads", used, len(paths), start)
    _check_used("coarse heads", used, len(paths), root, progress)
    return shares, used


def _show_progress(what: str, used: int, total: int, start: float) -> None:
    rate = used / max(time.monotonic() - start, 1e-9)
    left = (total - used) / max(rate, 1e-9)
    print(f"\r{what}: {used}/{total} images, {rate:.0f} img/s, ETA {left:.0f} s", end="", file=sys.stderr, flush=True)


def _check_used(what: str, used: int, total: int, root: Path, progress: bool) -> None:
    if progress:
        print(file=sys.stderr)
    if used == 0:
        raise ViewGraphError(f"none of the {total} images under {root} could be read for the {what}")


def open_model(path: str | Path, sha256: str | None) -> OnnxModel:
    """The index's model, refused when it is gone or is no longer the file the index was labelled with."""
    path = Path(path)
    if not path.is_file():
        raise ViewGraphError(f"the index was made with the model {path}, which is not there any more; put it back "
                             "or use another --measure")
    if sha256 and file_sha256(path) != sha256:
        raise ViewGraphError(f"{path} is not the model the index was labelled with (its SHA-256 differs); index the "
                             "folder again with this model, or use another --measure")
    try:
        return OnnxModel(path, device="auto")
    except (ValueError, FileNotFoundError) as error:
        raise ViewGraphError(str(error)) from None
