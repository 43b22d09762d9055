"""``twist finetune`` on cifar10-test: ACC before and after a simulated person confirms 1 % and then 5 % of images.

Run as ``flock /tmp/bench.lock python -m bench.finetune --run RUN --data CIFAR_TEST --work WORK`` (timed runs
must not overlap). The model is the
20-minute CPU run (patches backbone, K = 10); it is never retrained or modified here.

The simulated person: images are chosen at random (fixed seed; the 1 % set is the first 100 of the same
permutation whose first 500 make the 5 % set). Each gets the cluster that represents its class, i.e. the
cluster the Hungarian matching of the model's clusters to the classes pairs with it: what a person does who
opens each cluster, recognises its class, and moves a wrongly placed image to the cluster of its class (or
confirms it where it already is). The labels go to ``twist finetune --labels`` as a CSV of path and cluster.

Reported: ACC/NMI over all 10,000 images (transductive) and ACC over the images NOT confirmed, so that the
gain is not just the given labels; ``given_labels_only`` is the ACC of the unchanged model with the confirmed
images' labels set by hand, the gain a person gets without fine-tuning.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import normalized_mutual_info_score

from bench.common import machine, run_clusters, save
from twist_core.evaluation.evaluate import EvalImages, load_eval_images
from twist_core.evaluation.metrics import contingency, hungarian_accuracy
from twist_core.model.checkpoint import load_checkpoint


def scores(clusters: np.ndarray, data: EvalImages, confirmed: np.ndarray) -> dict[str, float]:
    k, c = int(clusters.max()) + 1, len(data.class_names)
    rest = np.ones(len(clusters), bool)
    rest[confirmed] = False
    return {"acc": hungarian_accuracy(contingency(clusters, data.labels, k, c))[0],
            "nmi": float(normalized_mutual_info_score(data.labels, clusters)),
            "acc_not_confirmed": hungarian_accuracy(contingency(clusters[rest], data.labels[rest], k, c))[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="the K=10 run to fine-tune (the 20-minute CPU run)")
    parser.add_argument("--data", required=True, help="cifar10-test as class folders (the person's labels, scoring)")
    parser.add_argument("--work", required=True, help="folder for the labels and the new runs")
    parser.add_argument("--time-budget", default="5m")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fractions", default="0.01,0.05")
    args = parser.parse_args()
    work, run, data_root = Path(args.work), Path(args.run), Path(args.data)
    work.mkdir(parents=True, exist_ok=True)
    config = load_checkpoint(run)["config"]
    data = load_eval_images(data_root, int(config["image_size"]), 2, progress=False)
    before = run_clusters(run, data)
    n_classes = len(data.class_names)
    _, cluster_to_class = hungarian_accuracy(contingency(before, data.labels, 10, n_classes))
    cluster_of_class = {cls: cluster for cluster, cls in cluster_to_class.items()}
    order = np.random.default_rng(args.seed).permutation(len(data.files))
    result: dict = {"model": str(run), "data": str(data_root), "n_images": len(data.files),
                    "model_eval": json.loads((run / "eval.json").read_text())["acc"],
                    "before": scores(before, data, np.zeros(0, dtype=np.int64)),
                    "mapping": "each confirmed image gets the cluster the Hungarian matching pairs with its class",
                    "cluster_of_class": {data.class_names[c]: k for c, k in sorted(cluster_of_class.items())},
                    "machine": machine()}
    for fraction in [float(f) for f in args.fractions.split(",")]:
        n = round(fraction * len(data.files))
        confirmed = order[:n]
        table = work / f"confirmed_{n}.csv"
        with open(table, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label"])
            writer.writerows([data.files[i], cluster_of_class[int(data.labels[i])]] for i in confirmed)
        given = before.copy()
        given[confirmed] = [cluster_of_class[int(label)] for label in data.labels[confirmed]]
        out = work / f"finetuned_{n}"
        command = [sys.executable, "-m", "twist_core.cli", "finetune", str(run), "--labels", str(table),
                   "--out", str(out), "--time-budget", args.time_budget, "--seed", str(args.seed), "--no-progress"]
        load = os.getloadavg()
        began = time.perf_counter()
        subprocess.run(["rm", "-rf", str(out)], check=True)
        subprocess.run(command, check=True)
        seconds = time.perf_counter() - began
        report = json.loads((out / "finetune.json").read_text())
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        name = f"after_{round(fraction * 100)}pct"
        result[name] = {**scores(run_clusters(out, data), data, confirmed), "confirmed": n,
                        "given_labels_only": scores(given, data, confirmed)["acc"],
                        "command": " ".join(command[1:]), "seconds": seconds, "epochs": metrics[-1]["epoch"],
                        "steps": metrics[-1]["step"], "options": report["options"], "load_before": load}
        print(name, json.dumps({k: v for k, v in result[name].items() if k in ("acc", "nmi", "acc_not_confirmed",
                                                                            "given_labels_only")}), flush=True)
    print(save("finetune", result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
