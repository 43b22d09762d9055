"""Run under torchrun: train a DDP model one step in ``process_group``, then list the threads left behind.

Leaving the group must end the backend's threads while the interpreter is alive; threads still running at
shutdown can abort a rank whose work is done.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from twist_core import distributed


def thread_names() -> list[str]:
    names = []
    for task in Path("/proc/self/task").iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # the thread ended while we looked
            continue
    return sorted(names)


def main(out_folder: str) -> None:
    with distributed.process_group("cpu"):
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 2))
        model(torch.ones(4, 3)).sum().backward()
        during = thread_names()
        del model
    result = {"during": during, "after": thread_names()}
    Path(out_folder, f"rank{os.environ['RANK']}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
