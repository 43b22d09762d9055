"""How a command that writes files ends: one block naming each file (or folder) it wrote and what it holds.

Every such command (train, finetune, eval, export, label, index, search, suggest-merges, duplicates, demo,
import-labels, restore-state) ends with :func:`print_written`, so a person never has to guess what appeared
where, and the block reads the same everywhere::

    wrote:
      r.json  the full report (metrics, per-cluster table, baselines)
      r.png   the confusion matrix
    next: twist ...

Only paths that exist when the block is printed are named: a file that a command writes only sometimes is
listed when it was written, never promised.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

Written = tuple[str | Path, str]  # a path, and what it holds (a few words)


def written_lines(entries: Iterable[Written], next_step: str | None = None) -> list[str]:
    """``wrote:`` then one aligned line per existing path (a folder ends with ``/``), then ``next: ...``."""
    present = [(f"{path}/" if Path(path).is_dir() and not str(path).endswith("/") else str(path), what)
               for path, what in entries if Path(path).exists()]
    lines = []
    if present:
        width = max(len(path) for path, _ in present)
        lines = ["wrote:", *(f"  {path:<{width}}  {what}" for path, what in present)]
    return lines + ([f"next: {next_step}"] if next_step else [])


def print_written(entries: Iterable[Written], next_step: str | None = None, stream: TextIO | None = None) -> None:
    """Print :func:`written_lines` (to stdout unless ``stream``), the last thing a command says."""
    lines = written_lines(entries, next_step)
    if lines:
        print("\n".join(lines), file=stream or sys.stdout, flush=True)
