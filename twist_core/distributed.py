"""One code path for one process and for torchrun: gloo on CPU, NCCL on GPU, any number of nodes."""

from __future__ import annotations

import contextlib
import datetime
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(preference: str = "auto") -> torch.device:
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


def setup(device_preference: str = "auto") -> Context:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); otherwise run alone, no group needed."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Context(0, 1, 0, pick_device(device_preference))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference)
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        _import_before_joining()
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return Context(dist.get_rank(), dist.get_world_size(), local_rank, device)


def _import_before_joining() -> None:
    """Import ``torch.distributed.nn.functional`` while no group exists.

    That module binds the default group into its functions' defaults when first imported, and
    DistributedDataParallel imports it. Imported after joining, it holds the group past
    ``destroy_process_group``: the backend's threads live on until the interpreter shuts down, and the group's
    destruction there can abort a rank that finished its work ("terminate called without an active
    exception", SIGABRT; seen once in CI on a 2-process gloo run). Imported first, its defaults are None.
    """
    import torch.distributed.nn.functional  # noqa: F401


@contextlib.contextmanager
def process_group(device_preference: str = "auto") -> Iterator[Context]:
    """``setup`` for the body, then leave the group.

    On success every rank waits at a barrier first, since a rank that destroys the group while a peer still
    talks can abort (gloo). After an error the peers may never arrive, so it leaves without waiting.
    """
    try:
        yield setup(device_preference)
    except BaseException:
        if _joined():
            dist.destroy_process_group()
        raise
    if _joined():
        dist.barrier()
        dist.destroy_process_group()


def _joined() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_gather_objects(ctx: Context, item: Any) -> list[Any]:
    if not ctx.distributed:
        return [item]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, item)
    return gathered


def any_rank(ctx: Context, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any: ranks must stop at the same step."""
    if not ctx.distributed:
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    dist.all_reduce(tensor)
    return bool(tensor.item() > 0)


def sum_across(ctx: Context, tensor: torch.Tensor) -> torch.Tensor:
    if ctx.distributed:
        tensor = tensor.to(ctx.device)
        dist.all_reduce(tensor)
    return tensor


def broadcast_int(ctx: Context, value: int) -> int:
    """Rank 0's value on every rank (decisions from timing must agree, or collectives would hang)."""
    if not ctx.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=ctx.device)
    dist.broadcast(tensor, src=0)
    return int(tensor.item())


@dataclass(frozen=True)
class EvenPasses:
    """Batches for a pass over ``n`` items made by every rank in lockstep (BatchNorm re-estimation).

    The passes depend only on the item count, the world size and the batch size, never on the rank, so every
    rank makes the same number of forward passes (SyncBatchNorm waits on all ranks at each one) and every batch
    holds at least 2 items (BatchNorm in train mode needs 2). Each rank takes ``items[rank::world]``; with
    fewer than 2 items per rank, every rank takes the same items instead.
    """

    batch_sizes: list[int] = field(default_factory=list)
    shared: bool = False

    def batches(self, items: list[int], rank: int, world_size: int) -> list[list[int]]:
        mine = items if self.shared else items[rank::world_size]
        batches, start = [], 0
        for size in self.batch_sizes:
            batches.append(mine[start:start + size])
            start += size
        return batches


def even_passes(n_items: int, world_size: int, batch_size: int) -> EvenPasses:
    """Equal shares (the remainder, under ``world_size`` items, is left out) cut into nearly equal batches."""
    if n_items < 2:
        return EvenPasses()
    share, shared = n_items // world_size, False
    if share < 2:  # too few to split: every rank sees the same images, which keeps the statistics right
        share, shared = n_items, True
    passes = max(1, min(math.ceil(share / max(batch_size, 2)), share // 2))
    base, extra = divmod(share, passes)
    return EvenPasses([base + 1] * extra + [base] * (passes - extra), shared)
