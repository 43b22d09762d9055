"""A patch-dictionary stem learned from the folder itself, for fast CPU training on small images.

Coates & Ng (2011) showed that one layer of k-means "atoms" on contrast-normalised, ZCA-whitened 6x6 patches,
encoded with a soft threshold and pooled, already separates CIFAR-10 classes far better than pixels. The
dictionary is fitted once on the training images in seconds (no labels, nothing downloaded) and then frozen:
the network trains only what comes after it, so it needs no backward pass through the image-sized maps and a
two-core CPU learns clusters in minutes, where a ResNet trained from scratch barely leaves the pixel baseline.

How well the stem's features alone separate classes, and what the backbone reaches on photos, is measured in
the guide (section 1, "Photo folders") and ``bench/results/patch_kmeans.json`` / ``photos.json``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from twist_core.data.preprocess import IMAGENET_MEAN, IMAGENET_STD

PATCH = 6  # px side of an atom (Coates & Ng's best on 32 px images)
PATCH_DIM = 3 * PATCH * PATCH
STRIDE = 2  # half the positions of stride 1 in each direction: 4x cheaper, nearly the same accuracy
POOL_GRID = 3  # average-pool the code maps to 3 x 3 regions
CONTRAST_EPS = 10.0  # added to each patch's variance (pixel units 0-255) so flat patches are not amplified noise
WHITEN_EPS = 0.1  # added to the eigenvalues before ZCA whitening
THRESHOLD = 0.25  # soft threshold of the polarity-split code
KMEANS_CHUNK = 65536  # points per distance matrix in k-means (65536 x 256 floats: 64 MiB)
CACHE_CHUNK = 32  # images per slice of the stem's forward pass (see PatchDictionaryStem.forward)


class PatchDictionaryStem(nn.Module):
    """Normalised images -> 2K code maps: ``relu(+-<atom, whitened contrast-normalised patch> - threshold)``.

    Whitening and the atoms fold into one K-filter convolution and each patch's standard deviation comes from
    average pooling, so the stem is plain convolution arithmetic that exports to ONNX. All tensors are
    buffers, set by :meth:`load_dictionary`, never by gradient descent.
    """

    def __init__(self, atoms: int):
        super().__init__()
        self.register_buffer("filters", torch.zeros(atoms, 3, PATCH, PATCH))
        self.register_buffer("offsets", torch.zeros(atoms))  # <atom, whitened mean patch>
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.out_channels = 2 * atoms

    @torch.no_grad()
    def load_dictionary(self, dictionary: PatchDictionary) -> None:
        """Fold whitening into the atoms: <a, W(u - mu)> = <W a, u> - <a, W mu>, as W is symmetric.

        Normalised patches sum to zero, so the constant vector is in the whitening's null direction and every
        atom, hence every folded filter, sums to zero: the filter ignores the patch mean, and the stem needs
        only each patch's standard deviation. Removing the float residue of the sum keeps that exact.
        """
        folded = dictionary.atoms @ dictionary.whitening
        folded = folded - folded.mean(1, keepdim=True)
        self.filters.copy_(folded.reshape(self.filters.shape).float())
        self.offsets.copy_((dictionary.atoms @ (dictionary.whitening @ dictionary.patch_mean)).float())

    def code_maps(self, images: torch.Tensor) -> torch.Tensor:
        pixels = (images * self.std + self.mean) * 255.0
        # Zero-sum filters and variances ignore a constant: centring each image keeps E[x^2] - E[x]^2 from
        # cancelling in float32 on bright flat areas (255^2 against a variance of a few units).
        pixels = pixels - pixels.mean(dim=(1, 2, 3), keepdim=True)
        grey_mean = F.avg_pool2d(pixels.mean(1, keepdim=True), PATCH, STRIDE)
        grey_sq_mean = F.avg_pool2d((pixels * pixels).mean(1, keepdim=True), PATCH, STRIDE)
        variance = (grey_sq_mean - grey_mean * grey_mean).clamp(min=0) * (PATCH_DIM / (PATCH_DIM - 1))
        response = F.conv2d(pixels, self.filters, stride=STRIDE) / torch.sqrt(variance + CONTRAST_EPS)
        offsets = self.offsets.view(1, -1, 1, 1)
        return torch.cat([F.relu(response - (offsets + THRESHOLD)), F.relu((offsets - THRESHOLD) - response)], 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Code maps average-pooled to POOL_GRID x POOL_GRID regions.

        The maps are 2K channels at nearly full resolution: made and pooled a few images at a time they stay in
        the CPU cache, which makes the stem 3-5x faster on a 2-core machine. The exported graph is one batch.
        """
        if torch.onnx.is_in_onnx_export():
            return region_average(self.code_maps(images), POOL_GRID)
        return torch.cat([F.adaptive_avg_pool2d(self.code_maps(chunk), POOL_GRID)
                          for chunk in images.split(CACHE_CHUNK)])


def region_average(maps: torch.Tensor, grid: int) -> torch.Tensor:
    """``adaptive_avg_pool2d(maps, grid)`` written as two small matrix products, for ONNX.

    The ONNX exporter cannot pool to a fixed grid when height and width are dynamic; averaging matrices built
    from the traced sizes (the same regions: rows floor(i n / grid) to ceil((i + 1) n / grid)) can.
    """

    def averaging(size: int) -> torch.Tensor:
        positions = torch.arange(size, device=maps.device).view(1, -1)
        region = torch.arange(grid, device=maps.device).view(-1, 1)
        inside = (positions >= region * size // grid) & (positions < ((region + 1) * size + grid - 1) // grid)
        weights = inside.to(maps.dtype)
        return weights / weights.sum(1, keepdim=True)

    return torch.einsum("nchw,ih,jw->ncij", maps, averaging(maps.shape[-2]), averaging(maps.shape[-1]))


def sample_patches(images: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random 6x6 patches (float, pixel units) drawn evenly from uint8 N x 3 x H x W images."""
    n = images.shape[0]
    per_image = -(-count // n)
    chunks = []
    for start in range(0, n, 256):
        batch = images[start:start + 256].float()
        columns = F.unfold(batch, PATCH)  # B x 108 x positions
        picks = torch.randint(0, columns.shape[2], (batch.shape[0], per_image), generator=generator)
        chunks.append(columns.gather(2, picks.unsqueeze(1).expand(-1, columns.shape[1], -1))
                      .transpose(1, 2).reshape(-1, columns.shape[1]))
    patches = torch.cat(chunks)
    return patches[torch.randperm(len(patches), generator=generator)[:count]]


def kmeans(points: torch.Tensor, k: int, iterations: int, generator: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means from random points; an empty cluster is re-seeded at a random point.

    Not ``faiss.Kmeans``, although faiss is a dependency: both make equally good frozen features
    (``bench/results/patch_kmeans.json``), but the shipped photo default trained better on these atoms than on
    faiss's (``bench/results/photos.json``, ``kmeans_check``).
    """
    centroids = points[torch.randperm(len(points), generator=generator)[:k]].clone()
    squared_norms = (points * points).sum(1, keepdim=True)
    for _ in range(iterations):
        assignment = torch.empty(len(points), dtype=torch.long)
        for start in range(0, len(points), KMEANS_CHUNK):
            chunk = slice(start, start + KMEANS_CHUNK)
            distances = squared_norms[chunk] - 2 * points[chunk] @ centroids.T + (centroids * centroids).sum(1)
            assignment[chunk] = distances.argmin(1)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, points)
        counts = torch.bincount(assignment, minlength=k).float()
        reseeds = points[torch.randint(0, len(points), (k,), generator=generator)]
        centroids = torch.where((counts > 0).view(-1, 1), sums / counts.clamp(min=1).view(-1, 1), reseeds)
    return centroids


@dataclass(frozen=True)
class PatchDictionary:
    """What was learned: the mean normalised patch, the ZCA whitening matrix and the unit-length atoms."""

    patch_mean: torch.Tensor  # 108
    whitening: torch.Tensor  # 108 x 108, symmetric
    atoms: torch.Tensor  # K x 108


def normalise_patches(patches: torch.Tensor) -> torch.Tensor:
    """Per-patch contrast normalisation: zero mean, unit (regularised) standard deviation."""
    centred = patches - patches.mean(1, keepdim=True)
    return centred / torch.sqrt(centred.var(1, keepdim=True) + CONTRAST_EPS)


@torch.no_grad()
def learn_patch_dictionary(images: torch.Tensor, atoms: int, seed: int = 0, n_patches: int = 100_000,
                           iterations: int = 10) -> PatchDictionary:
    """k-means atoms of whitened, contrast-normalised patches of uint8 images (N x 3 x H x W, H, W >= 6)."""
    if images.shape[0] == 0 or min(images.shape[2:]) < PATCH:
        raise ValueError(f"the patch dictionary needs images of at least {PATCH} x {PATCH} px")
    generator = torch.Generator().manual_seed(seed)
    patches = normalise_patches(sample_patches(images, n_patches, generator).double())
    patch_mean = patches.mean(0)
    eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov((patches - patch_mean).T))
    whitening = eigenvectors @ torch.diag((eigenvalues.clamp(min=0) + WHITEN_EPS).rsqrt()) @ eigenvectors.T
    whitened = ((patches - patch_mean) @ whitening).float()
    centroids = kmeans(whitened, atoms, iterations, generator).double()
    return PatchDictionary(patch_mean, whitening, F.normalize(centroids, dim=1))


class PatchBackbone(nn.Module):
    """Frozen patch-dictionary stem with its 3x3 pooling, then BatchNorm: the embedding the TWIST head sees."""

    def __init__(self, atoms: int):
        super().__init__()
        self.stem = PatchDictionaryStem(atoms)
        self.feature_dim = self.stem.out_channels * POOL_GRID * POOL_GRID
        self.norm = nn.BatchNorm1d(self.feature_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.norm(torch.flatten(self.stem(images), 1))
