"""Images as fixed-size uint8 tensors, decoded in worker processes or once into a RAM cache.

Augmentation happens later on whole batches (see :mod:`twist_core.augment`), so a sample here is just
the decoded image, resized so its shorter side is ``size`` and centre-cropped square.
A file that fails to decode yields an all-zero image and its reason; the training loop drops it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from twist_core.folder import DEFAULT_MAX_PIXELS, ImageReadError, decode_image, resize_center_crop


def decode_size(image_size: int) -> int:
    """Square side images are decoded to before cropping: the crop itself for small images, else 256 for 224.

    Training takes random crops of it; inference (and the exported model's contract) takes the central crop.
    """
    return image_size if image_size <= 64 else round(image_size * 256 / 224)


class FolderImages(Dataset):
    """``dataset[i] -> (i, uint8 tensor 3 x size x size, error message or "")``."""

    def __init__(self, root: str | Path, files: list[str], size: int, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.root = Path(root)
        self.files = files
        self.size = size
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, str]:
        try:
            image = decode_image(self.root / self.files[index], self.max_pixels, draft_size=self.size)
            array = np.asarray(resize_center_crop(image, self.size), dtype=np.uint8)
            return index, torch.from_numpy(array.copy()).permute(2, 0, 1), ""
        except ImageReadError as error:
            return index, torch.zeros(3, self.size, self.size, dtype=torch.uint8), str(error)
        except Exception as error:  # never let one odd file stop a long run
            return index, torch.zeros(3, self.size, self.size, dtype=torch.uint8), f"{type(error).__name__}: {error}"


class EpochBatches:
    """A batch sampler whose batches are replaced every epoch, so persistent workers can be reused."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def epoch_batches(n_items: int, batch_size: int, epoch: int, seed: int, rank: int, world_size: int,
                  exclude: set[int] | None = None) -> list[list[int]]:
    """This rank's batches for one epoch: a global shuffle seeded by (seed, epoch), split evenly over ranks.

    Every rank gets the same number of full batches (the remainder is dropped, a different part each epoch),
    which keeps BatchNorm statistics sane and DDP steps in lockstep.
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n_items, generator=generator).tolist()
    if exclude:
        order = [i for i in order if i not in exclude]
    global_batch = batch_size * world_size
    n_steps = len(order) // global_batch
    return [order[(step * world_size + rank) * batch_size:(step * world_size + rank + 1) * batch_size]
            for step in range(n_steps)]


def make_loader(dataset: FolderImages, sampler: EpochBatches, workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                      persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)


def decode_all(dataset: FolderImages, workers: int, progress: bool = True) -> tuple[torch.Tensor, dict[int, str]]:
    """Decode every image once into one uint8 tensor (N x 3 x S x S); returns it and the failures."""
    from tqdm import tqdm

    cache = torch.zeros(len(dataset), 3, dataset.size, dataset.size, dtype=torch.uint8)
    failures: dict[int, str] = {}
    loader = DataLoader(dataset, batch_size=256, num_workers=workers, shuffle=False)
    with tqdm(total=len(dataset), desc="decoding", unit="img", disable=not progress) as bar:
        for indices, images, errors in loader:
            cache[indices] = images
            for index, error in zip(indices.tolist(), errors, strict=True):
                if error:
                    failures[index] = error
            bar.update(len(indices))
    return cache, failures
