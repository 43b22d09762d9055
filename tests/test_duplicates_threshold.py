"""``twist duplicates`` with its default ``--threshold auto``: planted copies of real photos are found, few others.

A fixed cosine means nothing across embeddings (0.95 marked 21 % of a photo set as duplicates), so the default is
calibrated on the index's own nearest-neighbour distances. Here real CIFAR photos get resized, re-encoded and
lightly cropped copies, a real (tiny) model labels and indexes the folder, and the CLI runs as a subprocess.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import REPO, export_label_index

PLANTED = 12


def twist(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "twist_core.cli", *args], capture_output=True, text=True,
                            timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def plant_copies(images: Path, originals: list[Path]) -> dict[str, str]:
    """A near copy of each original, made three ways in turn; returns copy -> original, paths under ``images``."""
    pairs = {}
    for number, original in enumerate(originals):
        picture = Image.open(original).convert("RGB")
        width, height = picture.size
        copy = images / "copies" / f"copy{number:02d}.jpg"
        copy.parent.mkdir(exist_ok=True)
        if number % 3 == 0:  # resized up and saved again
            picture.resize((width * 2, height * 2), Image.BICUBIC).save(copy, quality=90)
        elif number % 3 == 1:  # re-encoded as a lower-quality JPEG
            picture.save(copy, quality=60)
        else:  # a pixel or two cropped from the edges
            picture.crop((1, 1, width - 1, height - 1)).save(copy, quality=90)
        pairs[str(copy.relative_to(images))] = str(original.relative_to(images))
    return pairs


def test_auto_threshold_finds_planted_copies(tmp_path: Path, tiny_run: Path, cifar_1k: Path) -> None:
    images = tmp_path / "images"
    for class_dir in sorted(p for p in cifar_1k.iterdir() if p.is_dir()):
        (images / class_dir.name).mkdir(parents=True)
        for picture in sorted(class_dir.iterdir())[:30]:
            shutil.copy(picture, images / class_dir.name / picture.name)
    everything = sorted(images.rglob("*.jpg"))
    originals = [everything[i] for i in np.random.default_rng(0).choice(len(everything), PLANTED, replace=False)]
    pairs = plant_copies(images, originals)
    index = tmp_path / "index"
    export_label_index(tiny_run, images, tmp_path / "model.onnx", tmp_path / "labels.csv", index)

    found = twist("duplicates", str(index), "--device", "cpu", "--json", str(tmp_path / "auto.json"))
    report = json.loads((tmp_path / "auto.json").read_text())
    threshold, stats = report["threshold"], report["threshold_statistics"]
    assert report["threshold_rule"].startswith("an outlier among the nearest-neighbour distances")
    assert stats["images_measured"] == len(everything) + PLANTED
    assert stats["nearest_similarity_median"] < threshold < 1.0  # above the typical nearest neighbour
    assert f"threshold {threshold:.6f} (auto)" in found.stdout
    groups = [{hit["path"] for hit in group} for group in report["groups"]]
    caught = sum(any({copy, original} <= group for group in groups) for copy, original in pairs.items())
    flagged = set().union(*groups) if groups else set()
    strangers = flagged - set(pairs) - set(pairs.values())
    print(f"auto threshold {threshold}, {caught}/{PLANTED} planted pairs, {len(strangers)} other images, {stats}")
    assert caught >= PLANTED * 3 // 4, found.stdout
    assert len(strangers) <= 0.02 * len(everything), strangers

    # an explicit threshold is used as given; a stricter one finds no more than auto did
    strict = twist("duplicates", str(index), "--device", "cpu", "--threshold", "0.99999",
                   "--json", str(tmp_path / "strict.json"))
    fixed = json.loads((tmp_path / "strict.json").read_text())
    assert (fixed["threshold"], fixed["threshold_rule"], fixed["threshold_statistics"]) == (0.99999,
                                                                                          "given (--threshold)", {})
    assert "(auto)" not in strict.stdout
