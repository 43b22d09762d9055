"""The neighbour stage measured: real `twist train` runs that differ only in its options, same seeds and length.

Each variant is a list of `twist train` options added to the default command on one labelled folder (the folder
is also the evaluation set, as clustering papers do). A run folder that already holds a finished run (DONE) is
only collected, so a queue can be stopped and restarted. Runs hold a `flock` on a lock file so that two runs of
this bench never share the cores. For each run the final evaluation gives the head's ACC/NMI, k-means on the
head's own embedding, the kNN ceiling (20-NN vote, uses the labels), the expected calibration error and the share
of images whose cluster disagrees with most of their 20 neighbours; results go to bench/results/neighbours.json
under SECTION/VARIANT, with per-seed rows and means, and the gap to the kNN ceiling closed against the variant
named `off`.

    python -m bench.neighbours --data caltech20 --section caltech20_15m --budget 15m --seeds 0 \\
        --variant off="--neighbour-fraction 0" --variant default=""

The over-clustering probe scores the K-way coarse head of runs trained with `--classes 3K --coarse-classes K`
(the same layers and loss as `--overcluster 3K`, whose head is not exported) into SECTION/VARIANT:

    python -m bench.neighbours --data caltech20 --section overcluster_probe --score-coarse k60_c20 RUN [...]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.common import REPO, RESULTS, extract, machine, save

FOLDERS = {"cifar10-test": ("cifar10-test.tar.gz", 10), "caltech20": ("caltech20.tar.gz", 20), "digits": (None, 10)}
SCORES = ("acc", "nmi", "ari", "kmeans_acc", "kmeans_nmi", "knn_acc", "ece", "neighbour_disagreement")


def folder(name: str, workdir: Path) -> tuple[Path, int]:
    archive, classes = FOLDERS[name]
    if archive is None:
        from twist_core.demo import write_digits

        return write_digits(workdir / "digits"), classes
    return extract(archive, workdir), classes


def train(data: Path, run: Path, classes: int, length: list[str], seed: int, options: list[str], lock: Path) -> None:
    if (run / "DONE").exists():
        return
    command = [sys.executable, "-m", "twist_core.cli", "train", str(data), "--out", str(run), "--classes",
               str(classes), "--eval-data", str(data), "--eval-every", "1000", "--no-progress", "--seed", str(seed),
               *length, *options]
    if (run / "last.pt").exists():
        command.append("--resume")
    print("$", shlex.join(command), flush=True)
    subprocess.run(["flock", str(lock), *command], check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def collect(run: Path) -> dict[str, Any]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    config = json.loads((run / "config.json").read_text())
    final = rows[-1]
    trained = [r for r in rows if "images_per_s" in r]
    return {"seed": config["seed"], **{k: round(final["eval"][k], 4) for k in SCORES},
            "epochs": final["epoch"], "run_seconds": round(final["run_seconds"]),
            "images_per_s": round(sum(r["images_per_s"] for r in trained) / max(1, len(trained)), 1),
            "options": {k: config[k] for k in ("backbone", "image_size", "neighbour_fraction", "neighbour_k",
                                                "neighbour_share", "neighbour_every", "self_label_fraction")}}


def coarse_head_scores(run: Path, data: Path) -> dict[str, Any]:
    """ACC/NMI of the run's K-way head and of its first coarse head, if any, on ``data``: one clean pass."""
    import numpy as np
    import torch

    from twist_core.data.preprocess import centre_crop_normalise
    from twist_core.evaluation.evaluate import load_eval_images
    from twist_core.evaluation.metrics import cluster_report
    from twist_core.model.checkpoint import load_checkpoint
    from twist_core.model.network import TwistModel, checkpoint_spec, recalibrate_batchnorm

    checkpoint = load_checkpoint(run)
    spec = checkpoint_spec(checkpoint)
    model = TwistModel(spec)
    model.load_state_dict(checkpoint["model"])
    images = load_eval_images(data, spec.input_size, 2, progress=False, resize_size=spec.resize_size)

    def batches():
        return (centre_crop_normalise(images.images[i:i + 256], spec.input_size)
                for i in range(0, len(images.images), 256))

    recalibrate_batchnorm(model, batches())
    model.eval()
    with torch.no_grad():
        outputs = [model(batch, all_heads=True) for batch in batches()]
    heads = [("fine", torch.cat([o[1] for o in outputs]).argmax(1).numpy(), spec.n_classes)]
    if spec.coarse_classes:
        heads.append(("coarse", torch.cat([o[2][0] for o in outputs]).argmax(1).numpy(), spec.coarse_classes[0]))
    found = {}
    for name, clusters, k in heads:
        report = cluster_report(np.asarray(clusters), images.labels, k, images.class_names)
        found[name] = {"k": k, "acc": round(report["acc"], 4), "nmi": round(report["nmi"], 4)}
    config = checkpoint["config"]
    return {"seed": config["seed"], "epochs": checkpoint["epoch"], **found, "run": str(run)}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    mean = {k: round(sum(r[k] for r in rows) / len(rows), 4) for k in SCORES}
    return {"seeds": [r["seed"] for r in rows], "mean": mean, "runs": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=sorted(FOLDERS), required=True)
    parser.add_argument("--section", required=True, help="name of this table in neighbours.json")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=OPTIONS")
    parser.add_argument("--score-coarse", nargs=2, action="append", default=[], metavar=("VARIANT", "RUN"))
    parser.add_argument("--seeds", default="0")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int)
    length.add_argument("--budget")
    parser.add_argument("--runs", type=Path, default=Path("/tmp/twist-bench/neighbours"))
    parser.add_argument("--note", default="")
    args = parser.parse_args()

    args.runs.mkdir(parents=True, exist_ok=True)
    data, classes = folder(args.data, args.runs.parent)
    path = RESULTS / "neighbours.json"
    result = json.loads(path.read_text()) if path.exists() else {"machine": machine(), "sections": {}}
    if args.score_coarse:
        section = result["sections"].setdefault(args.section, {"data": args.data, "note": args.note, "variants": {}})
        for name, run in args.score_coarse:
            section["variants"].setdefault(name, {"runs": []})["runs"].append(coarse_head_scores(Path(run), data))
            print(name, json.dumps(section["variants"][name]["runs"][-1]), flush=True)
        print(f"wrote {save('neighbours', result)}")
        return
    if not (args.variant and (args.epochs or args.budget)):
        parser.error("give --variant and --epochs or --budget (or --score-coarse)")
    length_options = ["--epochs", str(args.epochs)] if args.epochs else ["--time-budget", args.budget]
    lock = args.runs.parent / "bench.lock"
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = dict(item.split("=", 1) for item in args.variant)
    table: dict[str, Any] = {}
    for name, options in variants.items():
        rows = []
        for seed in seeds:
            run = args.runs / f"{args.section}_{name}_s{seed}"
            train(data, run, classes, length_options, seed, shlex.split(options), lock)
            rows.append(collect(run))
        table[name] = {"options": options, **summarise(rows)}
        print(name, json.dumps(table[name]["mean"]), flush=True)
    if "off" in table:
        base = table["off"]["mean"]
        for entry in table.values():
            gap_before = base["knn_acc"] - base["acc"]
            entry["knn_gap"] = round(entry["mean"]["knn_acc"] - entry["mean"]["acc"], 4)
            entry["gap_closed_vs_off"] = round(1 - entry["knn_gap"] / gap_before, 3) if gap_before > 0 else None
    result = json.loads(path.read_text()) if path.exists() else result  # other runs may have written meanwhile
    result["sections"][args.section] = {
        "data": args.data, "classes": classes, "length": " ".join(length_options), "note": args.note,
        "variants": table}
    print(f"wrote {save('neighbours', result)}")


if __name__ == "__main__":
    main()
