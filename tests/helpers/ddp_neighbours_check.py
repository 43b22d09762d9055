"""Mine the neighbour table of planted images with a small ResNet, alone or as one of torchrun's ranks.

Each rank embeds only its share of the images (every other one), as training does; every rank saves the table
it ends with (``table_world{W}_rank{R}.npy``) and rank 0 the planted groups (``groups.npy``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from twist_core import distributed
from twist_core.model.network import ModelSpec, TwistModel
from twist_core.train.neighbours import broadcast_buffers, mine

GROUPS, PER_GROUP, SIZE = 6, 5, 16


def planted_images() -> tuple[torch.Tensor, np.ndarray]:
    """Noisy copies of a few random images: an image's nearest others are the copies of its own original."""
    generator = torch.Generator().manual_seed(5)
    originals = torch.rand(GROUPS, 3, SIZE, SIZE, generator=generator)
    groups = np.arange(GROUPS * PER_GROUP) % GROUPS
    images = originals[groups] + 0.02 * torch.randn(len(groups), 3, SIZE, SIZE, generator=generator)
    return images, groups


def main(out: str) -> None:
    with distributed.process_group("cpu") as ctx:
        torch.manual_seed(0)  # the same weights on every rank
        model = TwistModel(ModelSpec(backbone="resnet18", width=8, small_stem=True, hidden_dim=32, n_classes=4))
        broadcast_buffers(ctx, model)
        images, groups = planted_images()
        share = list(range(len(groups)))[ctx.rank::ctx.world_size]
        batches = [(share[i:i + 4], images[share[i:i + 4]]) for i in range(0, len(share), 4)]
        table = mine(ctx, model, batches, len(groups), PER_GROUP - 1)
        np.save(Path(out) / f"table_world{ctx.world_size}_rank{ctx.rank}.npy", table.numpy())
        if ctx.is_main:
            np.save(Path(out) / "groups.npy", groups)


if __name__ == "__main__":
    main(sys.argv[1])
