"""Checkpoints of plain tensors and Python types, written atomically and loaded with ``weights_only=True``."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from twist_core.errors import UserError
from twist_core.io_utils import atomic_write
from twist_core.layout import CHECKPOINT_FILE

REQUIRED_KEYS = ("config", "model", "epoch", "global_step", "history")


class CheckpointError(UserError, ValueError):
    """A checkpoint that is truncated, empty, not written by ``twist train``, or holds more than plain data."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint or a run folder's latest one, never unpickling arbitrary objects.

    Anything unreadable becomes one ``CheckpointError`` naming the file, so commands print one line instead
    of torch's advice to unpickle the file anyway (which would run whatever code it holds).
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, OSError) as error:
        raise CheckpointError(f"{path} is not a readable training checkpoint ({_first_line(error)}): it may be "
                              "truncated or not written by `twist train`; restore it from a copy or start a new run "
                              "in another folder") from None
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED_KEYS):
        raise CheckpointError(f"{path} is a PyTorch file but not a `twist train` checkpoint (no "
                              f"{'/'.join(REQUIRED_KEYS)}); give the run folder or its last.pt")
    return state


def _first_line(error: BaseException) -> str:
    """The first line of an error, cut short, without torch's advice to load with ``weights_only=False``."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if "weights_only" in text:
        text = "it holds objects other than tensors and plain Python values"
    return text[:160]
