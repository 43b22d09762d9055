"""Merge, then self-train: K = 30 merged down to 10 and fine-tuned on its own merged clusters, against the
K = 10 run fine-tuned on its own clusters for the same epochs (the fair control). No labels except to score.

Arm ``k30_merged``: the K = 30 run's clusters (from its index) are grouped by the plan of
``twist suggest-merges --to 10``; every image becomes a row of a ``twist finetune --labels`` CSV with its
group's target cluster as label, status ``merged`` where its own cluster was merged away (which drops that
cluster from the head) and ``confirmed`` where it already is the target: what a person gets who applies the
suggested merges in the app and confirms every cluster. Arm ``k10``: the K = 10 run's own clusters, every image
``confirmed``. Both then run ``twist finetune`` for the same fixed number of epochs (not a time budget, so the
machine's load does not change the result), same seed, same options. With ``--keep F`` only the share F of each
cluster's images most confidently in it (summed top-k probability over the group's clusters) is labelled; the
rest train with the TWIST loss alone (SCAN-style confident self-labelling).

Scoring: the fine-tuned checkpoint in eval mode on cifar10-test (as the exported model assigns), ACC / NMI / ARI
against the class folders. Results are added to bench/results/merge.json under ``k30_merged_selftrained``,
``k10_selftrained`` and ``selftrain`` (the other keys are kept). Run it serialised with other timed work:

    flock /tmp/bench.lock python -m bench.merge_selftrain --k10-run RUN10 --k30-run RUN30 --indexes MERGE_WORK \\
        --data CIFAR_TEST --work WORK --epochs 12 [--seeds 0 1] [--keep 1.0 0.5]

The recorded figures came from ``--epochs 12 --seeds 0 --keep 1.0 0.5``, ``--epochs 12 --seeds 1 --keep 1.0`` and
``--epochs 36 --seeds 0 --keep 1.0 --arms k30_merged`` (about 2.5 minutes per 12 epochs on an idle 2-core CPU).
With ``--pair patches_conv_seedS`` (run from the folder the pair was trained in, ``--indexes`` the folder
of ``python -m bench.merge --another-seed``) the same is done for that pair, recorded under
``other_seeds[PAIR].selftrain``;
the ``patches-conv`` seeds 2-4 were run with ``--epochs 12 --seeds 0`` (about 4.7 minutes per 12 epochs).
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
from typing import Any

import numpy as np

from bench.common import RESULTS, machine, run_clusters, save
from bench.merge_setup import score
from twist_core.curate import merges
from twist_core.evaluation.evaluate import load_eval_images
from twist_core.index.metadata import IndexMetadata, meta_path

ARMS = ("k30_merged", "k10")
TARGET = 10
CONDITIONS = {
    "data": "cifar10-test, 10,000 images; the class folders are used only to score",
    "runs": "k10: the 20-minute K=10 run (96 epochs); k30_merged: the K=30 run with the same 96 epochs",
    "labels": "from each run's index (bench/merge.py's k10_index / k30_index): its top-1 cluster, for k30_merged "
              "mapped through the plan of twist suggest-merges --to 10 (modularity, no labels)",
    "finetune": "twist finetune RUN --labels CSV --epochs E --seed S, defaults otherwise (lr 0.05, 1 warm-up "
                "epoch, 64 labelled images per step, cross-entropy weight 1, TWIST loss on every image); the "
                "patches backbone's dictionary stays frozen, its code BatchNorm and the head train",
    "names": "ARM_keepF_eE_sS: share F of each cluster labelled (most confident first), E epochs, seed S",
    "score": "the fine-tuned checkpoint in eval mode on all 10,000 images; ACC (Hungarian) / NMI / ARI"}


def index_paths(index: Path, ids: np.ndarray) -> list[str]:
    """Each id's image path as the index stores it (relative to the data folder)."""
    meta = IndexMetadata(meta_path(index))
    try:
        paths = dict(meta.all_paths())
    finally:
        meta.close()
    return [paths[int(i)] for i in ids]


def group_mass(data: merges.ClusterData, into: np.ndarray) -> np.ndarray:
    """Each image's summed top-k probability over the clusters that go where its label goes: its confidence in
    the merged cluster (the plain top-1 probability when nothing is merged)."""
    lookup = np.arange(max(int(data.topk_clusters.max()), int(data.labels.max())) + 1)
    lookup[: len(into)] = into
    target = np.where(data.topk_clusters >= 0, lookup[np.clip(data.topk_clusters, 0, None)], -1)
    merged_label = lookup[data.labels]
    return np.where(target == merged_label[:, None], data.topk_probs, 0.0).sum(axis=1)


def self_labels(arm: str, indexes: Path, pair: str = "") -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray,
                                                                  dict[str, Any]]:
    """(paths, label, own cluster, confidence, plan) of every image for ``arm``, from the run's index only
    (``k10_index`` / ``k30_index``, or ``k10_PAIR_index`` / ``k30_PAIR_index`` as ``bench/merge.py
    --another-seed PAIR`` leaves them)."""
    index = indexes / "_".join([arm.split("_")[0], *([pair] if pair else []), "index"])
    data = merges.data_from_index(index)
    into = np.arange(int(data.labels.max()) + 1)
    plan: dict[str, Any] = {}
    if arm == "k30_merged":
        found = merges.plan_merges(data, merges.gather_evidence(data, merges.DEFAULT_MEASURE), TARGET)
        for source, target in found.merges:
            into[source] = target
        plan = found.as_dict()
    return index_paths(index, data.ids), into[data.labels], data.labels, group_mass(data, into), plan


def write_table(path: Path, rows: tuple[list[str], np.ndarray, np.ndarray, np.ndarray], keep: float) -> int:
    """The finetune CSV: per cluster, the ``keep`` share of its images most confidently in it; returns the rows."""
    paths, label, own, confidence = rows
    chosen: list[int] = []
    for cluster in np.unique(label):
        members = np.nonzero(label == cluster)[0]
        ranked = members[np.argsort(-confidence[members], kind="stable")]
        chosen.extend(ranked[: max(1, round(keep * len(members)))].tolist())
    for source in np.unique(own[label != own]):  # every merged-away cluster needs a 'merged' row to leave the head
        if not any(own[i] == source for i in chosen):
            chosen.append(int(np.nonzero(own == source)[0][np.argmax(confidence[own == source])]))
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "status", "predicted"])
        for i in sorted(chosen):
            status = "merged" if label[i] != own[i] else "confirmed"
            writer.writerow([paths[i], int(label[i]), status, int(own[i])])
    return len(chosen)


def finetune(run: Path, table: Path, out: Path, epochs: int, seed: int) -> dict[str, Any]:
    """``twist finetune`` of ``run`` on ``table`` into ``out`` (replaced), fixed epochs."""
    command = [sys.executable, "-m", "twist_core.cli", "finetune", str(run), "--labels", str(table),
               "--out", str(out), "--epochs", str(epochs), "--seed", str(seed), "--no-progress"]
    subprocess.run(["rm", "-rf", str(out)], check=True)
    load, began = os.getloadavg(), time.perf_counter()
    subprocess.run(command, check=True)
    report = json.loads((out / "finetune.json").read_text())
    steps = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return {"command": "twist " + " ".join(command[3:]), "seconds": round(time.perf_counter() - began, 1),
            "load_before": [round(x, 2) for x in load], "epochs": steps["epoch"], "steps": steps["step"],
            "classes_after": report["classes_after"], "labelled_images": report["labelled_images"]}


def headline(runs: dict[str, Any], arm: str, epochs: int) -> dict[str, Any]:
    """The arm with every image labelled after ``epochs`` of fine-tuning: the mean over the seeds measured."""
    picked = {name: run for name, run in runs.items() if name.startswith(f"{arm}_keep1_e{epochs}_s")}
    if not picked:
        return {}
    mean = {key: round(float(np.mean([run[key] for run in picked.values()])), 4) for key in ("acc", "nmi", "ari")}
    how = ("the K=30 run, merged to 10 by the plan of twist suggest-merges --to 10 (no labels), then twist finetune "
           "with every image labelled with its merged cluster" if arm == "k30_merged" else
           "the K=10 run, then twist finetune with every image labelled with its own cluster (the control)")
    return {**mean, "seeds": {name: [run["acc"], run["nmi"]] for name, run in picked.items()},
            "finetune_epochs": epochs, "how": how}


def verdict(result: dict[str, Any]) -> str:
    """Whether merge-then-self-train meets the target, against the pure K=10 run and against the control."""
    merged, k10, control = result["k30_merged_selftrained"], result["k10"], result["k10_selftrained"]

    def against(other: dict[str, Any]) -> str:
        met = merged["acc"] >= other["acc"] and merged["nmi"] >= other["nmi"]
        return f"{'meets' if met else 'misses'} ({merged['acc']} / {merged['nmi']} vs {other['acc']} / {other['nmi']})"

    return (f"K=30 merged to 10 and self-trained for {merged['finetune_epochs']} epochs {against(k10)} the K=10 run "
            f"as trained (which used less compute), and {against(control)} the K=10 run self-trained the same way "
            "(the fair control); ACC / NMI, means over seeds")


def pair_means(saved: dict[str, Any]) -> dict[str, Any]:
    """Means over every --pair that has both self-trained arms: the K=10 run as trained, the merged and
    self-trained K=30 run, the control, and on how many pairs the merged one meets the K=10 run on both."""
    pairs = {name: pair for name, pair in saved.get("other_seeds", {}).items()
             if pair.get("selftrain", {}).get("k30_merged_selftrained") and pair["selftrain"].get("k10_selftrained")}
    if not pairs:
        return {}

    def mean(pick: Any) -> dict[str, float]:
        return {key: round(float(np.mean([pick(pair)[key] for pair in pairs.values()])), 4) for key in ("acc", "nmi")}

    meets = sum(all(p["selftrain"]["k30_merged_selftrained"][k] >= p["k10"][k] for k in ("acc", "nmi"))
                for p in pairs.values())
    return {"pairs": list(pairs), "k10": mean(lambda p: p["k10"]),
            "k30_merged_selftrained": mean(lambda p: p["selftrain"]["k30_merged_selftrained"]),
            "k10_selftrained": mean(lambda p: p["selftrain"]["k10_selftrained"]),
            "merged_selftrained_meets_k10_on": f"{meets} of {len(pairs)} pairs"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k10-run", required=True, help="the K=10 run (the 20-minute one of bench/merge.py)")
    parser.add_argument("--k30-run", required=True, help="the K=30 run of the same recipe")
    parser.add_argument("--indexes", required=True, help="bench/merge.py's --work folder (k10_index, k30_index)")
    parser.add_argument("--data", required=True, help="cifar10-test as class folders (scoring only)")
    parser.add_argument("--work", required=True, help="folder for the label tables and new runs")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--keep", type=float, nargs="+", default=[1.0], help="share of each cluster labelled")
    parser.add_argument("--headline-epochs", type=int, default=12, help="fine-tuning epochs of the headline keys")
    parser.add_argument("--arms", nargs="+", default=["k30_merged", "k10"], choices=ARMS)
    parser.add_argument("--pair", default="", help="a pair of bench/merge.py --another-seed: its indexes, and results "
                                                   "under other_seeds[PAIR].selftrain instead of the headline keys")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    runs = {"k10": Path(args.k10_run), "k30_merged": Path(args.k30_run)}
    data = load_eval_images(args.data, 32, 2, progress=False)
    found: dict[str, Any] = {}
    for arm in args.arms:
        paths, label, own, confidence, plan = self_labels(arm, Path(args.indexes), args.pair)
        classes = np.array([data.class_names.index(p.split("/")[0]) for p in paths])  # scoring only
        found[f"{arm}_before"] = {**score(label, classes, data.class_names), "plan": plan}
        for keep in args.keep:
            table = work / f"{arm}{'_' + args.pair if args.pair else ''}_keep{keep:g}.csv"
            n = write_table(table, (paths, label, own, confidence), keep)
            for seed in args.seeds:
                name = f"{arm}_keep{keep:g}_e{args.epochs}_s{seed}"
                out = work / (f"{args.pair}_{name}" if args.pair else name)
                ran = finetune(runs[arm], table, out, args.epochs, seed)
                after = score(run_clusters(out, data), data.labels, data.class_names)
                found[name] = {**after, "keep": keep, "rows": n, **ran}
                print(name, json.dumps({k: found[name][k] for k in ("acc", "nmi", "ari", "seconds")}), flush=True)
    previous = json.loads((RESULTS / "merge.json").read_text())  # read now: keep what other runs added meanwhile
    home = previous["other_seeds"][args.pair] if args.pair else previous
    runs = {**home.get("selftrain", {}).get("runs", {}), **found}
    home["selftrain"] = {"runs": runs, "conditions": CONDITIONS, "machine": machine()}
    results = home["selftrain"] if args.pair else previous
    results["k30_merged_selftrained"] = headline(runs, "k30_merged", args.headline_epochs)
    results["k10_selftrained"] = headline(runs, "k10", args.headline_epochs)
    if results["k30_merged_selftrained"] and results["k10_selftrained"]:
        home["selftrain"]["verdict"] = verdict({**results, "k10": home["k10"]})
        print(home["selftrain"]["verdict"])
    if args.pair:
        previous["other_seeds_selftrain_means"] = pair_means(previous)
    save("merge", previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
