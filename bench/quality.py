"""Clustering quality in a wall-clock budget: `twist train --time-budget`, then `twist eval`, as a user runs them.

CPU default: the 10,000 images of cifar10-test (transductive, as clustering papers do), 20 minutes, K = 10,
every other option left at its default. On a GPU (--gpu): train on cifar10-train (50,000) and evaluate on
cifar10-test. Prints ACC / NMI / ARI beside k-means on raw pixels and writes bench/results/quality*.json.
Usage: python -m bench.quality [--budget 20m] [--gpu] [--workdir DIR] [-- extra twist train options]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import REPO, extract, machine, save


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", default="20m")
    parser.add_argument("--gpu", action="store_true", help="train on cifar10-train, evaluate on cifar10-test")
    parser.add_argument("--workdir", default=None, help="keep the extracted data and the run here")
    parser.add_argument("--name", default=None, help="results file name (default quality or quality_gpu)")
    parser.add_argument("extra", nargs="*", help="extra `twist train` options (after --)")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="twist_quality_"))
    workdir.mkdir(parents=True, exist_ok=True)
    test_root = extract("cifar10-test.tar.gz", workdir)
    train_root = extract("cifar10-train.tar.gz", workdir) if args.gpu else test_root
    run = workdir / "run"
    shutil.rmtree(run, ignore_errors=True)  # the bench's own run folder: a fresh run every time
    command = [sys.executable, "-m", "twist_core.cli", "train", str(train_root), "--out", str(run), "--classes", "10",
               "--time-budget", args.budget, "--eval-data", str(test_root), "--no-progress", *args.extra]
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO)
    train_seconds = time.perf_counter() - started
    report_path = workdir / "eval.json"
    subprocess.run([sys.executable, "-m", "twist_core.cli", "eval", str(run), str(test_root), "--json",
                    str(report_path)], check=True, cwd=REPO)
    report = json.loads(report_path.read_text())
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained = [row for row in history if "images_per_s" in row]
    config = json.loads((run / "config.json").read_text())
    result = {
        "machine": machine(), "budget": args.budget, "train_wall_seconds": train_seconds,
        "epochs": trained[-1]["epoch"], "steps": trained[-1]["step"],
        "images_per_s_mean": sum(r["images_per_s"] for r in trained) / len(trained),
        "twist": {m: report[m] for m in ("acc", "nmi", "ami", "ari", "knn_acc")},
        "baselines": report["baselines"], "clusters_in_use": report["clusters_in_use"],
        "config": config, "eval_curve": [(row["epoch"], row["eval"]) for row in history if "eval" in row],
    }
    path = save(args.name or ("quality_gpu" if args.gpu else "quality"), result)
    pixels = report["baselines"]["kmeans_pixels"]
    print(f"\nTWIST ({args.budget}, {result['epochs']} epochs, {result['images_per_s_mean']:.0f} img/s): "
          f"ACC {report['acc']:.3f}  NMI {report['nmi']:.3f}  ARI {report['ari']:.3f}  kNN {report['knn_acc']:.3f}")
    print(f"k-means on raw pixels:        ACC {pixels['acc']:.3f}  NMI {pixels['nmi']:.3f}  ARI {pixels['ari']:.3f}")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
