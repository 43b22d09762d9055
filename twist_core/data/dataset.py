"""Images as fixed-size uint8 tensors, decoded in worker processes or once into a RAM cache.

Augmentation happens later on whole batches (see :mod:`twist_core.data.augment`), so a sample here is just
the decoded image, resized so its shorter side is ``size`` and centre-cropped square.
A file that fails to decode yields an all-zero image and its reason; the training loop drops it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from twist_core.data.folder import DEFAULT_MAX_PIXELS, ImageReadError, decode_image, resize_center_crop
from twist_core.data.preprocess import Preprocess


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
    cache = torch.zeros(len(dataset), 3, dataset.size, dataset.size, dtype=torch.uint8)
    return cache, _decode_into(cache, dataset, workers, progress)


def _decode_into(cache: torch.Tensor, dataset: Dataset, workers: int, progress: bool) -> dict[int, str]:
    """Decode ``dataset`` (all of it, or a Subset) into its rows of ``cache``; returns the failures."""
    from tqdm import tqdm

    failures: dict[int, str] = {}
    loader = DataLoader(dataset, batch_size=256, num_workers=workers, shuffle=False)
    with tqdm(total=len(dataset), desc="decoding", unit="img", disable=not progress) as bar:
        for indices, images, errors in loader:
            cache[indices] = images
            for index, error in zip(indices.tolist(), errors, strict=True):
                if error:
                    failures[index] = error
            bar.update(len(indices))
    return failures


SHARED_MEMORY = Path("/dev/shm")


def decode_per_node(dataset: FolderImages, workers: int, rank: int, world_size: int, local_rank: int,
                      local_world_size: int, progress: bool = True) -> tuple[torch.Tensor, dict[int, str]]:
    """``decode_all`` once per node: each local process decodes its share into one shared-memory buffer.

    On an 8-GPU node this is one copy of the images and 1/8 of the decoding per process, instead of eight
    of each. One process, or /dev/shm too small to hold the images (a small container default): ``decode_all``.
    """
    import os
    import uuid

    import torch.distributed as dist

    if world_size == 1:
        return decode_all(dataset, workers, progress)
    shape = (len(dataset), 3, dataset.size, dataset.size)
    needed = int(np.prod(shape))
    token = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    path = SHARED_MEMORY / f"twist-cache-{token[0]}"
    room = [local_rank != 0 or _shared_memory_free() > needed * 1.05]
    everyone: list[list[bool]] = [[]] * world_size
    dist.all_gather_object(everyone, room)
    if not all(flag for flags in everyone for flag in flags):
        return decode_all(dataset, workers, progress)
    if local_rank == 0:
        with open(path, "wb") as handle:
            handle.truncate(needed)
    dist.barrier()
    cache = torch.from_file(str(path), shared=True, size=needed, dtype=torch.uint8).view(shape)
    dist.barrier()  # every process has mapped the file: its name can go, the memory stays until they exit
    if local_rank == 0:
        os.unlink(path)
    mine = list(range(local_rank, len(dataset), local_world_size))
    failures = _decode_into(cache, torch.utils.data.Subset(dataset, mine), workers, progress)
    gathered: list[dict[int, str]] = [{}] * world_size
    dist.all_gather_object(gathered, failures)
    dist.barrier()  # every share is written before anyone trains on it
    return cache, {index: reason for part in gathered for index, reason in part.items()}


def _shared_memory_free() -> int:
    import os

    try:
        stats = os.statvfs(SHARED_MEMORY)
    except OSError:
        return 0
    return stats.f_bavail * stats.f_frsize


class DecodedCrops(Dataset):
    """``dataset[i] -> (i, uint8 H x W x 3 crop, error or "")``; one bad file never stops the run."""

    def __init__(self, root: Path, files: list[str], transform: Preprocess):
        self.root, self.files, self.transform = root, files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray | None, str]:
        try:
            return index, self.transform.crop(self.transform.load(self.root / self.files[index])), ""
        except ImageReadError as error:
            return index, None, str(error)
        except Exception as error:
            return index, None, f"{type(error).__name__}: {error}"


def collate(items: list[tuple[int, np.ndarray | None, str]]) -> tuple[list[int], torch.Tensor, list[str]]:
    """Good crops stacked into one tensor (shared memory between processes), errors kept by position."""
    crops = [crop for _, crop, _ in items if crop is not None]
    stacked = torch.from_numpy(np.stack(crops)) if crops else torch.zeros(0, dtype=torch.uint8)
    return [i for i, _, _ in items], stacked, [error for _, _, error in items]
