"""Two gloo processes under torchrun against one process on the concatenated batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from twist_core.train.loss import self_label_loss, twist_multicrop_loss

HELPERS = Path(__file__).parent / "helpers"


def torchrun(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    # PYTHONFAULTHANDLER: a rank that aborts prints every thread's Python stack, so a rare failure says where.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def test_two_processes_give_single_process_loss_and_gradients(tmp_path: Path) -> None:
    out = tmp_path / "ddp.json"
    result = torchrun([str(HELPERS / "ddp_loss_check.py"), str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = json.loads(out.read_text())

    generator = torch.Generator().manual_seed(11)
    views = [(torch.randn(24, 10, generator=generator, dtype=torch.float64) * 2).requires_grad_(True)
             for _ in range(3)]
    parts = twist_multicrop_loss(views, 2, tau=0.5, lam1=0.2, lam2=1.5)
    total = parts["loss"] + self_label_loss(views, 2, tau=0.5, keep_fraction=0.5)
    total.backward()

    for rank in ranks:
        assert rank["loss"] == pytest.approx(parts["loss"].item(), abs=1e-5)
        assert rank["total"] == pytest.approx(total.item(), abs=1e-5)
    for view_index, view in enumerate(views):
        # DDP averages gradients over the 2 processes; the effective logit gradient is rank gradient / 2.
        distributed_grad = np.concatenate([np.array(r["grads"][view_index]) for r in ranks]) / 2
        np.testing.assert_allclose(distributed_grad, view.grad.numpy(), atol=1e-5, rtol=0)
        assert np.abs(view.grad.numpy()).max() > 1e-3  # the comparison is not between zeros


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists threads through Linux /proc")
def test_leaving_the_group_ends_the_backend_threads(tmp_path: Path) -> None:
    result = torchrun([str(HELPERS / "ddp_teardown_check.py"), str(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        threads = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert any("gloo" in name for name in threads["during"])  # the probe sees the backend's threads
        assert not [name for name in threads["after"] if "gloo" in name], threads["after"]


@pytest.mark.parametrize("backbone", ["patches", "resnet18"])
def test_two_process_training_runs(tmp_path: Path, shapes_folder: Path, backbone: str) -> None:
    out = tmp_path / "run"
    result = torchrun(["-m", "twist_core.train", str(shapes_folder), "--out", str(out), "--classes", "4",
                       "--backbone", backbone, "--width", "8", "--hidden-dim", "32", "--image-size", "32",
                       "--epochs", "2", "--batch-size", "8", "--workers", "0", "--no-progress"])
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]  # one writer: rank 0
    assert metrics[-1]["step"] == 2 * (48 // 16)  # global batch 2 x 8 over 48 images
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["config"]["backbone"] == backbone
    # The default neighbour stage covers epoch 2: mined over all 48 images, not over one rank's half.
    assert checkpoint["paired_epoch"] == 1 and checkpoint["neighbours"].shape[0] == 48
    assert (checkpoint["neighbours"] >= 0).all()
