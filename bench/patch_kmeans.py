"""Which k-means fits the patch dictionary: our Lloyd loop (``twist_core.model.patches.kmeans``) or faiss.Kmeans.

For each data set and dictionary seed: fit 256 atoms on (up to) 2,000 images' patches with each k-means, then
score the frozen stem's pooled features by leave-one-out cosine kNN accuracy against the class folders (labels
used only to score) and record each dictionary's residual (mean squared distance of 20,000 whitened patches to
their projection on the best-matching unit-length atom, lower is a closer fit). Writes
bench/results/patch_kmeans.json.

    python -m bench.patch_kmeans --data caltech20=PHOTOS:64 --data cifar10-test=CIFAR_TEST:32
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from bench.common import machine, save
from twist_core.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from twist_core.evaluation.evaluate import load_eval_images
from twist_core.evaluation.metrics import knn_accuracy
from twist_core.model import patches

ATOMS = 256
SAMPLE_IMAGES = 2000


def faiss_kmeans(points: torch.Tensor, k: int, iterations: int, generator: torch.Generator) -> torch.Tensor:
    """The alternative: faiss.Kmeans on every point, seeded from ``generator``."""
    import faiss

    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    clustering = faiss.Kmeans(points.shape[1], k, niter=iterations, seed=seed, max_points_per_centroid=len(points),
                              verbose=False)
    clustering.train(np.ascontiguousarray(points.numpy(), dtype=np.float32))
    return torch.from_numpy(clustering.centroids.copy())


def residual(dictionary: patches.PatchDictionary, images: torch.Tensor) -> float:
    """Mean squared distance of 20,000 whitened patches to their projection on the best-matching unit atom."""
    generator = torch.Generator().manual_seed(12345)
    sample = patches.normalise_patches(patches.sample_patches(images, 20000, generator).double())
    whitened = ((sample - dictionary.patch_mean) @ dictionary.whitening).float()
    atoms = dictionary.atoms.float()
    scale = (whitened @ atoms.T).clamp(min=0)  # best multiple of each unit atom
    residual = (whitened * whitened).sum(1, keepdim=True) - scale ** 2
    return float(residual.min(1).values.mean())


@torch.no_grad()
def stem_features(dictionary: patches.PatchDictionary, images: torch.Tensor) -> np.ndarray:
    stem = patches.PatchDictionaryStem(ATOMS)
    stem.load_dictionary(dictionary)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return torch.cat([torch.flatten(stem((images[s:s + 64].float() / 255 - mean) / std), 1)
                      for s in range(0, len(images), 64)]).numpy()


def compare(root: str, size: int, seeds: list[int]) -> dict:
    data = load_eval_images(root, size, 2, progress=False)
    offset = (data.images.shape[-1] - size) // 2  # the centre crop the network sees
    images = data.images[:, :, offset:offset + size, offset:offset + size].contiguous()
    fit_on = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:SAMPLE_IMAGES]]
    result: dict = {"images": len(images), "image_size": size, "atoms": ATOMS}
    lloyd = patches.kmeans
    for name, fit in (("lloyd (ours)", lloyd), ("faiss.Kmeans", faiss_kmeans)):
        runs = []
        patches.kmeans = fit
        try:
            for seed in seeds:
                start = time.perf_counter()
                dictionary = patches.learn_patch_dictionary(fit_on, ATOMS, seed=seed)
                seconds = time.perf_counter() - start
                runs.append({"seed": seed, "fit_seconds": round(seconds, 2),
                             "knn_acc": round(knn_accuracy(stem_features(dictionary, images), data.labels), 4),
                             "residual": round(residual(dictionary, fit_on), 4)})
                print(root, size, name, runs[-1], file=sys.stderr, flush=True)
        finally:
            patches.kmeans = lloyd
        result[name] = {"runs": runs, "knn_acc_mean": round(float(np.mean([r["knn_acc"] for r in runs])), 4),
                        "residual_mean": round(float(np.mean([r["residual"] for r in runs])), 4)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", action="append", required=True, help="NAME=CLASS_FOLDER_TREE:IMAGE_SIZE")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(2)
    result = {"machine": machine(), "what": __doc__.split("\n\n")[1].replace("\n", " "), "data": {}}
    for item in args.data:
        name, rest = item.split("=", 1)
        root, size = rest.rsplit(":", 1)
        result["data"][name] = compare(root, int(size), args.seeds)
    print(save("patch_kmeans", result))


if __name__ == "__main__":
    main()
