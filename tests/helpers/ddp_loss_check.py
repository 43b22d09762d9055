"""Run under torchrun: each rank takes its slice of fixed logits and writes its loss and logit gradients."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from twist_core.train.loss import self_label_loss, twist_multicrop_loss


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    generator = torch.Generator().manual_seed(11)
    views = [torch.randn(24, 10, generator=generator, dtype=torch.float64) * 2 for _ in range(3)]
    per_rank = 24 // world
    mine = [v[rank * per_rank:(rank + 1) * per_rank].clone().requires_grad_(True) for v in views]
    parts = twist_multicrop_loss(mine, 2, tau=0.5, lam1=0.2, lam2=1.5)
    total = parts["loss"] + self_label_loss(mine, 2, tau=0.5, keep_fraction=0.5)
    total.backward()
    result = {"rank": rank, "world": world, "loss": parts["loss"].item(), "total": total.item(),
              "grads": [m.grad.tolist() for m in mine]}
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        with open(out_path, "w") as handle:
            json.dump(gathered, handle)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
