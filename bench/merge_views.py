"""Does the model's own view graph make a better label-free merge plan than the kNN graph? Scored into merge.json.

``twist suggest-merges --to N`` groups the clusters so that the kNN graph of the embeddings is most modular.
``--measure views`` groups them the same way (greedy merges, then single clusters moved while modularity rises)
on another graph: how often the model puts two augmented views of one image into the two clusters
(twist_core.curate.view_graph). This bench plans both on the same index of one over-clustered run, for a few
seeds of the views, and scores them against the class folders (labels used only to score). Writes
``view_graph`` and ``view_graph_summary`` of bench/results/merge.json (or ``SECTION`` and ``SECTION_summary``),
with the K=10 result of ``other_seeds.NAME`` beside each run when bench/merge.py --another-seed NAME scored one.

    python -m bench.merge_views NAME OVER_RUN --data CIFAR_TEST [--work FOLDER] [--pairs 4] [--view-seeds 0 1]
    python -m bench.merge_views digits_k30 RUN --data DIGITS --section view_graph_digits   # another data set
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import RESULTS, machine, save
from bench.merge_setup import index_classes, planned_labels, prepare_index, recipe, score
from twist_core.curate import merges


def views_scores(index: Path, pairs: int, seeds: list[int]) -> dict[str, Any]:
    """The shipped plan and the views plan (one per seed of the augmentations) on ``index``, scored."""
    data = merges.data_from_index(index)
    classes, names = index_classes(index, data)
    knn = merges.plan_merges(data, merges.gather_evidence(data, merges.DEFAULT_MEASURE), len(names))
    found: dict[str, Any] = {"plan_as_shipped": score(planned_labels(data, knn), classes, names),
                             "views": {}}
    for seed in seeds:
        began = time.perf_counter()
        views = merges.model_evidence(index, data, merges.VIEWS, pairs, seed=seed, progress=False)
        evidence = merges.gather_evidence(data, merges.VIEWS, model_graph=views)
        plan = merges.plan_merges(data, evidence, len(names))
        found["views"][f"seed{seed}"] = {**score(planned_labels(data, plan), classes, names),
                                         "view_seconds": round(time.perf_counter() - began, 1)}
        print(f"views seed {seed}: {found['views'][f'seed{seed}']}", flush=True)
    runs = list(found["views"].values())
    found["views_mean"] = {key: round(float(np.mean([r[key] for r in runs])), 4) for key in ("acc", "nmi")}
    return found


def summary(runs: dict[str, Any]) -> dict[str, Any]:
    """Means over the scored runs of the shipped plan, the views plan (its seed mean per run) and K=10, with
    the views plan's gain per run: worth shipping as the default only if it gains on the mean and on most runs."""
    def mean(key: str, part: str) -> float:
        return round(float(np.mean([entry[part][key] for entry in runs.values()])), 4)

    gains = {name: {key: round(entry["views_mean"][key] - entry["plan_as_shipped"][key], 4) for key in ("acc", "nmi")}
             for name, entry in runs.items()}
    out: dict[str, Any] = {"runs": list(runs),
                           "plan_as_shipped": {k: mean(k, "plan_as_shipped") for k in ("acc", "nmi")},
                           "views": {k: mean(k, "views_mean") for k in ("acc", "nmi")}, "views_gain_per_run": gains,
                           "views_gains_acc_on": sum(gain["acc"] > 0 for gain in gains.values())}
    paired = [entry for entry in runs.values() if "k10_same_recipe" in entry]
    if len(paired) == len(runs):
        out["k10"] = {k: round(float(np.mean([e["k10_same_recipe"][k] for e in paired])), 4) for k in ("acc", "nmi")}
        out["views_at_least_k10_on_mean"] = all(out["views"][k] >= out["k10"][k] for k in ("acc", "nmi"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="the pair's name in other_seeds of merge.json (its K=10 run is shown beside)")
    parser.add_argument("over_run", help="the over-clustered (K=30) run")
    parser.add_argument("--data", required=True, help="cifar10-test class folders (scoring only)")
    parser.add_argument("--work", default="bench_work/merge")
    parser.add_argument("--pairs", type=int, default=merges.VIEW_PAIRS, help="augmented view pairs per image")
    parser.add_argument("--view-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--section", default="view_graph", help="key of merge.json to write (one per data set)")
    args = parser.parse_args()
    began = time.perf_counter()
    run = Path(args.over_run)
    index = prepare_index(run, Path(args.data), Path(args.work), args.name)
    found = {"run": str(run.resolve()), "recipe": recipe(run), "pairs": args.pairs,
             **views_scores(index, args.pairs, args.view_seeds), "machine": machine(),
             "seconds": round(time.perf_counter() - began, 1)}
    saved = json.loads((RESULTS / "merge.json").read_text())
    pair = saved.get("other_seeds", {}).get(args.name)
    if pair:  # the K=10 run of the same recipe and seed, scored by bench/merge.py --another-seed NAME
        found["k10_same_recipe"] = {k: pair["k10"][k] for k in ("acc", "nmi")}
    saved.setdefault(args.section, {})[args.name] = found
    saved[f"{args.section}_summary"] = summary(saved[args.section])
    print(json.dumps({k: found[k] for k in ("plan_as_shipped", "views_mean")}, indent=2))
    print(f"wrote {save('merge', saved)}")


if __name__ == "__main__":
    main()
