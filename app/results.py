"""What the workspace hands the UI and the API: its error, the records of its answers, and the progress callback
of a long action (plain data, no Gradio; split from :mod:`app.workspace` to keep that module readable)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from twist_core.curate.curation import Record

Progress = Callable[[int, int], None]  # (done, total) of a long action, for the UI's progress bar


def throttled(progress: Progress | None, steps: int = 100) -> Progress | None:
    """``progress`` called about ``steps`` times over a run, however many items it counts (and at the end)."""
    if progress is None:
        return None
    last = [-1]

    def report(done: int, total: int) -> None:
        step = done * steps // max(total, 1)
        if step != last[0] or done == total:
            last[0] = step
            progress(done, total)

    return report


class AppUserError(Exception):
    """Something the user can fix (missing model or index, bad upload, bad request); the message says what."""


@dataclass(frozen=True)
class Neighbour:
    record: Record
    similarity: float
    thumbnail: Path


@dataclass(frozen=True)
class ReviewItem:
    """An image of the review queue: its score, and the cluster its neighbours point to (None: no other)."""

    record: Record
    score: float
    suggestion: int | None
    thumbnail: Path | None  # None when asked for without thumbnails (the JSON API)


@dataclass(frozen=True)
class Prediction:
    """What the model says about one image: class probabilities (K) and its nearest indexed neighbours."""

    probs: np.ndarray
    neighbours: list[Neighbour]
