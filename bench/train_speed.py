"""Training throughput of the small-image presets against a plain PyTorch loop over pre-decoded tensors.

Each row uses one model (K = 10) and batch for both loops, on the same 10,000 CIFAR-10 images: the CPU
default for small images (frozen patch-dictionary stem, 256 atoms, MLP 1024) and ResNet-18s with the CIFAR
stem. `twist train` pays for everything a real run does (batched augmentation of two views, the TWIST loss,
metrics, checkpoints); the plain loop only crops/flips pre-decoded tensors and computes a simple loss: the
ceiling for the data pipeline. Writes bench/results/train_speed.json.
Usage: python -m bench.train_speed [--resnet-widths 32 16] [--batch 256] [--steps 15]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import REPO, extract, machine, save, subset_folder


def plain_loop_images_per_s(images: torch.Tensor, preset: dict, batch: int, steps: int) -> float:
    """Two random-crop/flip views, forward, a cross-view MSE on softmax outputs, backward, SGD step."""
    from twist_core.model.network import ModelSpec, TwistModel
    from twist_core.model.patches import PatchBackbone, learn_patch_dictionary

    model = TwistModel(ModelSpec(backbone=preset["backbone"], width=preset["width"], small_stem=True,
                                 hidden_dim=preset["hidden_dim"], n_classes=10))
    if isinstance(model.backbone, PatchBackbone):  # fitted once before training, as twist train does
        model.backbone.stem.load_dictionary(learn_patch_dictionary(images, preset["width"]))
    model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    floats = images.float().div(255)

    def view(batch_images: torch.Tensor) -> torch.Tensor:
        padded = torch.nn.functional.pad(batch_images, (4, 4, 4, 4), mode="reflect")
        x, y = torch.randint(0, 9, (2,)).tolist()
        out = padded[..., y:y + 32, x:x + 32]
        return (out.flip(-1) if torch.rand(()) < 0.5 else out).contiguous(memory_format=torch.channels_last)

    timed = 0.0
    for step in range(steps + 3):
        index = torch.randint(0, len(floats), (batch,))
        started = time.perf_counter()
        _, a = model(view(floats[index]))
        _, b = model(view(floats[index]))
        loss = (a.softmax(-1) - b.softmax(-1)).pow(2).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= 3:  # the first steps allocate
            timed += time.perf_counter() - started
    return steps * batch / timed


def twist_train_images_per_s(data: Path, preset: dict, batch: int, workdir: Path) -> float:
    run = workdir / f"run_{preset['backbone']}_{preset['width']}"
    subprocess.run([sys.executable, "-m", "twist_core.cli", "train", str(data), "--out", str(run), "--classes", "10",
                    "--backbone", preset["backbone"], "--width", str(preset["width"]), "--hidden-dim",
                    str(preset["hidden_dim"]), "--batch-size", str(batch), "--epochs", "1", "--no-progress",
                    "--checkpoint-every", "0"], check=True, cwd=REPO, capture_output=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return rows[-1]["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resnet-widths", type=int, nargs="*", default=[32, 16])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=15, help="timed steps of each loop")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="twist_speed_"))
    data = extract("cifar10-test.tar.gz", workdir)
    from twist_core.data.dataset import FolderImages, decode_all
    from twist_core.data.folder import scan_folder

    images, _ = decode_all(FolderImages(data, scan_folder(data), 32), workers=2, progress=False)
    presets = [{"name": "patches, 256 atoms, MLP 1024 (CPU default)", "backbone": "patches", "width": 256,
                "hidden_dim": 1024}]
    presets += [{"name": f"ResNet-18 width {width}, MLP 2048", "backbone": "resnet18", "width": width,
                 "hidden_dim": 2048} for width in args.resnet_widths]
    subset = subset_folder(data, args.batch * args.steps, workdir)
    rows = []
    for preset in presets:
        pipeline = twist_train_images_per_s(subset, preset, args.batch, workdir)
        ceiling = plain_loop_images_per_s(images, preset, args.batch, args.steps)
        rows.append({**preset, "twist_train_images_per_s": pipeline, "plain_loop_images_per_s": ceiling,
                     "ratio": pipeline / ceiling})
        print(f"{preset['name']:<45} batch {args.batch}: twist train {pipeline:7.1f} img/s, "
              f"plain loop {ceiling:7.1f} img/s, ratio {pipeline / ceiling:.2f}", flush=True)
    path = save("train_speed", {"machine": machine(), "batch": args.batch, "rows": rows})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
