"""Shared bench helpers: extract the CIFAR-10 archives from ../shared/data and save results as JSON."""

from __future__ import annotations

import json
import platform
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from twist_core.io_utils import atomic_write_text

if TYPE_CHECKING:
    from twist_core.evaluation.evaluate import EvalImages

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
RESULTS = REPO / "bench" / "results"


def extract(archive_name: str, destination: Path) -> Path:
    """Extract ``archive_name`` (e.g. cifar10-test.tar.gz) once into ``destination``; returns the class-folder root."""
    archive = DATA / archive_name
    if not archive.exists():
        raise SystemExit(f"{archive} not found: the benchmarks need ../shared/data")
    with tarfile.open(archive) as tar:
        top = tar.next().name.split("/")[0]
        root = destination / top
        if not root.exists():
            tar.extractall(destination, filter="data")
    return root


def machine() -> dict[str, str]:
    import os

    import torch

    return {"cpu": platform.processor() or platform.machine(), "cores": str(os.cpu_count()),
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"}


def summary_first(result: dict) -> dict:
    """The result with its readable part on top: ``notes``, ``conditions`` and every ``*_summary`` / ``*_means``
    entry before the full tables (a results file of thousands of lines opens on its conclusions)."""
    def rank(key: str) -> int:
        return {"notes": 0, "conditions": 1}.get(key, 2 if key.endswith(("_summary", "_means")) else 3)

    return {key: result[key] for key in sorted(result, key=rank)}  # sorted is stable: each part keeps its order


def save(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    atomic_write_text(path, json.dumps(summary_first(result), indent=2) + "\n")  # a kill never leaves half a file
    return path


def subset_folder(data: Path, n_images: int, workdir: Path) -> Path:
    """``n_images`` files spread evenly over the folder (class folders kept), as symlinks: a short timed epoch."""
    from twist_core.data.folder import scan_folder

    subset = workdir / f"subset{n_images}"
    files = scan_folder(data)
    for name in files[:: max(1, len(files) // n_images)][:n_images]:
        target = subset / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to(data / name)
    return subset


def run_clusters(run: Path, data: EvalImages) -> np.ndarray:
    """Cluster of every image of ``data`` (``EvalImages``) by the run's checkpoint in eval mode, as the exported
    model assigns it."""
    import torch

    from twist_core.evaluation.evaluate import predict_torch
    from twist_core.model.checkpoint import load_checkpoint
    from twist_core.model.network import ModelSpec, TwistModel

    checkpoint = load_checkpoint(run)
    model = TwistModel(ModelSpec(**checkpoint["model_spec"]))
    model.load_state_dict(checkpoint["model"])
    probs, _ = predict_torch(model, data.images, int(checkpoint["config"]["image_size"]), torch.device("cpu"))
    return probs.argmax(1)
