"""Multi-process safety: every rank makes the same collective calls even when folder sizes or decoding differ."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import draw_shapes_folder
from test_distributed import torchrun

from twist_core.distributed import even_passes


@pytest.mark.parametrize("batch_size", [2, 3, 16, 256])
def test_batchnorm_pass_plan_is_equal_on_every_rank_with_batches_of_two_or_more(batch_size: int) -> None:
    for world in range(1, 9):
        for n in range(2, 10_001):
            passes = even_passes(n, world, batch_size)
            sizes = passes.batch_sizes
            assert sizes and min(sizes) >= 2, (world, n, sizes)
            assert max(sizes) <= max(batch_size, 3) or passes.shared, (world, n, sizes)  # 3 when 2s leave one over
            if passes.shared:
                assert n < 2 * world and sum(sizes) == n
            else:
                assert sum(sizes) == n // world  # each rank's share, fully used; under `world` images left out


def test_pass_plan_batches_are_disjoint_and_equal_in_number() -> None:
    for world, n in [(2, 5_123), (3, 7), (8, 9), (8, 17), (5, 1_001)]:
        items = list(range(100, 100 + n))
        per_rank = [even_passes(n, world, 16).batches(items, rank, world) for rank in range(world)]
        assert len({len(batches) for batches in per_rank}) == 1
        used = [i for batches in per_rank for batch in batches for i in batch]
        assert set(used) <= set(items)
        if not even_passes(n, world, 16).shared:
            assert len(used) == len(set(used)) >= n - world + 1


def odd_folder(root: Path, broken: bool) -> Path:
    """47 drawn images (an odd count), plus a file that fails to decode if asked."""
    draw_shapes_folder(root)
    (root / "stripes" / "023.png").unlink()
    if broken:
        (root / "discs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def train_two_processes(data: Path, out: Path, *extra: str):
    return torchrun(["-m", "twist_core.train", str(data), "--out", str(out), "--classes", "4", "--width", "8",
                     "--hidden-dim", "32", "--image-size", "32", "--epochs", "1", "--batch-size", "4",
                     "--workers", "0", "--no-progress", *extra], timeout=300)


def test_two_processes_on_an_odd_folder_recalibrate_and_finish(tmp_path: Path) -> None:
    data = odd_folder(tmp_path / "odd", broken=False)
    out = tmp_path / "run"
    result = train_two_processes(data, out, "--backbone", "resnet18")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "DONE").read_text())["epoch"] == 1


def test_self_labelling_survives_a_broken_file_while_streaming(tmp_path: Path) -> None:
    data = odd_folder(tmp_path / "broken", broken=True)
    out = tmp_path / "run"
    result = train_two_processes(data, out, "--cache", "off", "--self-label-fraction", "1.0")
    assert result.returncode == 0, result.stderr[-3000:]
    final = json.loads((out / "DONE").read_text())
    assert final["self_labelling"] is True and final["skipped"] == 1
    assert "broken.png" in (out / "skipped.txt").read_text()
    shutil.rmtree(out)


def cache_run(folder: Path, out: Path, processes: int, *extra: str) -> list[dict]:
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    helper = Path(__file__).parent / "helpers" / "shared_cache_check.py"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                             str(processes), str(helper), str(folder), "128", str(out), *extra], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def test_ram_cache_is_decoded_once_per_node_in_shared_memory(cifar_1k: Path, tmp_path: Path) -> None:
    """2 gloo processes share one cache: the same images as one process decodes, at about one copy of memory."""
    import torch

    from twist_core.data.dataset import FolderImages, decode_all
    from twist_core.data.folder import scan_folder

    folder = tmp_path / "photos"
    shutil.copytree(cifar_1k, folder)
    (folder / "airplane" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    cache, failures = decode_all(FolderImages(folder, scan_folder(folder), 128), 0, progress=False)
    expected = int(cache.to(torch.int64).sum()) + int(cache[:, :, ::7, ::5].to(torch.int64).sum()) * 3
    shared = cache_run(folder, tmp_path / "shared.json", 2)
    private = cache_run(folder, tmp_path / "private.json", 2, "--private")
    single = cache_run(folder, tmp_path / "single.json", 1)
    for row in shared:
        assert row["checksum"] == expected
        assert {int(k): v for k, v in row["failures"].items()}.keys() == failures.keys()
    size = shared[0]["cache_bytes"]
    memory = {name: sum(r["pss_added"] for r in rows) / size for name, rows in
              (("shared", shared), ("private", private), ("single", single))}
    print(f"memory added by decoding, in cache sizes ({size / 2**20:.0f} MiB): {memory}")
    # Measured here: one process adds 1.8 cache sizes (the cache plus decoding's transient buffers); two processes
    # with a private cache each (as before) 3.5; two sharing one cache 2.1.
    assert memory["private"] > memory["single"] + 0.8  # a second copy
    assert memory["shared"] < memory["single"] + 0.5 and memory["shared"] < memory["private"] - 0.8
