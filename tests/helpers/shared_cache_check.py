"""Under torchrun: decode a folder into the RAM cache (one per node, or --private: one per process, as before).

Writes per rank: a checksum of the cache, the failures, and the proportional memory (PSS) the decode added.
Usage: torchrun --nproc_per_node N shared_cache_check.py FOLDER SIZE OUT.json [--private]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from twist_core.data.dataset import FolderImages, decode_all, decode_per_node
from twist_core.data.folder import scan_folder


def pss_bytes() -> int:
    """Proportional set size: shared pages count once, split among the processes that map them."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no Pss in /proc/self/smaps_rollup")


def main() -> None:
    folder, size, out = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    private = "--private" in sys.argv
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dataset = FolderImages(folder, scan_folder(folder), size)
    dist.barrier()
    before = pss_bytes()
    if private:
        cache, failures = decode_all(dataset, 0, progress=False)
    else:
        cache, failures = decode_per_node(dataset, 0, rank, world, int(os.environ["LOCAL_RANK"]),
                                          int(os.environ["LOCAL_WORLD_SIZE"]), progress=False)
    checksum = int(cache.to(torch.int64).sum()) + int(cache[:, :, ::7, ::5].to(torch.int64).sum()) * 3
    dist.barrier()
    added = pss_bytes() - before
    rows: list[dict] = [{}] * world
    dist.all_gather_object(rows, {"rank": rank, "checksum": checksum, "failures": failures, "pss_added": added,
                                  "cache_bytes": cache.numel()})
    if rank == 0:
        out.write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
