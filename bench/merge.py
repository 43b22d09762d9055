"""Over-cluster, then merge: K = 30 merged down to 10 with the suggestions, against training with K = 10.

For each data set: export, label and index the given runs (once, into --work), then for every similarity
measure merge the over-clustered model's clusters greedily (merge the top suggestion, recompute, repeat: what
clicking the first suggestion in the app does) and by cutting the hierarchy, down to the number of classes,
WITHOUT the labels; only then score against the class folders (ACC / NMI, twist_core's metrics). Also records the
K estimate (and the largest-gap alternative) per data set. Also the plan of ``twist suggest-merges --to N``
(greedy, then single clusters moved between groups while modularity rises) and label-free alternatives
(spectral partition of the cluster graph, other linkages, a soft re-labelling by summed top-k probability).
Writes bench/results/merge.json, keeping what bench/merge_selftrain.py (merge-then-self-train) and the
--another-seed, --caltech-pair and --variant-run modes added to it.

    python -m bench.merge --k10-run RUN10 --k30-run RUN30 --data CIFAR_TEST \
        [--digits-runs RUN ... --digits-data DIGITS] [--caltech-labels LABELS.csv] [--work FOLDER]
    python -m bench.merge --another-seed NAME --k10-run RUN10 --k30-run RUN30 --data CIFAR_TEST   # adds a pair
    python -m bench.merge --caltech-pair RUN20 RUN60 --caltech-data CALTECH20                     # adds caltech20
    python -m bench.merge --variant-run NAME RUN30 --data CIFAR_TEST   # a K=30 run with another --lam2 or --tau
    python -m bench.merge --other-k NAME RUN20 --data CIFAR_TEST       # the pair NAME's seed over-clustered less
    python -m bench.merge --coarse-run NAME RUN30C --data CIFAR_TEST   # the same with --coarse-classes 10
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy.cluster.hierarchy import cut_tree, linkage
from scipy.spatial.distance import squareform
from sklearn.cluster import SpectralClustering

from bench.common import RESULTS, machine, save
from bench.merge_measures import COMPARED
from bench.merge_setup import (
    index_classes,
    oracle_purity,
    planned_labels,
    prepare_index,
    recipe,
    score,
    trained_classes,
)
from twist_core.curate import merges


def cut_labels(result: merges.Suggestions, labels: np.ndarray, groups: int) -> np.ndarray:
    """Each image's group when the hierarchy is cut into ``groups``."""
    leaf_group = cut_tree(result.linkage, n_clusters=groups)[:, 0]
    lookup = dict(zip(result.clusters, leaf_group.tolist(), strict=True))
    return np.array([lookup[int(c)] for c in labels])


def soft_relabel(data: merges.ClusterData, clusters: np.ndarray, group_of: np.ndarray) -> np.ndarray:
    """Each image's group by the largest SUMMED top-k probability over the group's clusters (a re-labelling the
    app's whole-cluster merges cannot express; reported beside the hard merge)."""
    lookup = np.full(max(int(clusters.max()), int(data.topk_clusters.max())) + 1, -1)
    lookup[clusters] = group_of
    group = np.where(data.topk_clusters >= 0, lookup[np.clip(data.topk_clusters, 0, None)], -1)
    mass = np.zeros((len(group), int(group_of.max()) + 1))
    for column in range(group.shape[1]):
        rows = np.nonzero(group[:, column] >= 0)[0]
        np.add.at(mass, (rows, group[rows, column]), data.topk_probs[rows, column])
    return mass.argmax(axis=1)


def group_scores(data: merges.ClusterData, clusters: np.ndarray, group_of: np.ndarray, classes: np.ndarray,
                 class_names: list[str]) -> dict[str, Any]:
    """Hard merge (each image keeps its top-1 cluster's group) and the soft re-labelling of one grouping."""
    hard = group_of[np.searchsorted(clusters, data.labels)]
    return {**score(hard, classes, class_names),
            "soft_topk_relabel": score(soft_relabel(data, clusters, group_of), classes, class_names)}


def balanced_plan(data: merges.ClusterData, target: int, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """Merges chosen to maximise the kNN graph's modularity plus ``beta`` x the entropy of the group sizes (a prior
    for even groups, like TWIST's own diversity term): greedy pair merges, then single clusters moved between
    groups while the sum rises. Returns the clusters and each one's group."""
    clusters, sizes = merges.current_clusters(data.labels)
    evidence = merges.gather_evidence(data, merges.DEFAULT_MEASURE)
    links = merges.knn_links(evidence, np.searchsorted(clusters, data.labels), len(clusters),
                             np.ones(len(data.labels)))
    graph = (links + links.T) / max(2 * links.sum(), 1e-12)
    weight = np.array([sizes[c] for c in clusters], float) / len(data.labels)

    def value(groups: np.ndarray) -> float:
        share = np.bincount(groups, weight)
        share = share[share > 0]
        return merges.group_modularity(graph, groups) - beta * float(np.sum(share * np.log(share)))

    groups = np.arange(len(clusters))
    while groups.max() + 1 > target:
        tries = [np.unique(np.where(groups == b, a, groups), return_inverse=True)[1]
                 for a in range(groups.max() + 1) for b in range(a + 1, groups.max() + 1)]
        groups = max(tries, key=value)
    best, moved = value(groups), True
    while moved:
        moved = False
        for leaf in range(len(groups)):
            if np.count_nonzero(groups == groups[leaf]) == 1:
                continue
            for group in range(target):
                trial = groups.copy()
                trial[leaf] = group
                if value(trial) > best + 1e-12:
                    groups, best, moved = trial, value(trial), True
    return np.array(clusters), groups


BALANCE_BETAS = (0.05, 0.1)


def variants(data: merges.ClusterData, classes: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Label-free ways to group the clusters into the class count, all scored the same way afterwards."""
    target = len(class_names)
    clusters = np.array(merges.current_clusters(data.labels)[0])
    evidence = merges.gather_evidence(data, merges.DEFAULT_MEASURE)
    found: dict[str, Any] = {}
    greedy = merges.greedy_merges(data, evidence, target)[0]
    order = np.argsort(data.labels, kind="stable")
    first = order[np.searchsorted(data.labels[order], clusters)]  # one image of each cluster
    found["greedy_modularity"] = group_scores(data, clusters, np.unique(greedy[first], return_inverse=True)[1],
                                              classes, class_names)
    plan = merges.plan_merges(data, evidence, target)
    planned = planned_labels(data, plan)
    found["plan_to_n (suggest-merges --to N)"] = {
        **group_scores(data, clusters, np.unique(planned[first], return_inverse=True)[1], classes, class_names),
        "modularity": round(plan.modularity, 5), "greedy_modularity": round(plan.greedy_modularity, 5)}
    pos = np.searchsorted(clusters, data.labels)
    links = merges.knn_links(evidence, pos, len(clusters), np.ones(len(data.labels)))
    graph = links + links.T
    degree = graph.sum(axis=1)
    normalised = (graph - np.diag(np.diag(graph))) / np.sqrt(np.outer(degree, degree))
    for beta in BALANCE_BETAS:
        found[f"balanced_plan[beta={beta}]"] = group_scores(data, *balanced_plan(data, target, beta), classes,
                                                            class_names)
    for assign in ("kmeans", "discretize", "cluster_qr"):
        groups = SpectralClustering(target, affinity="precomputed", random_state=0,
                                    assign_labels=assign).fit_predict(normalised)
        found[f"spectral_ncut[{assign}]"] = group_scores(data, clusters, groups, classes, class_names)
    for measure in ("modularity", "knn-mean", "topk", "centroid"):
        distance = 1.0 - merges.similarity(data, merges.gather_evidence(data, measure), list(clusters))
        np.fill_diagonal(distance, 0.0)
        for method in ("average", "complete", "ward", "weighted"):
            tree = linkage(squareform(np.clip(distance, 0.0, None), checks=False), method=method)
            found[f"cut[{measure},{method}]"] = group_scores(data, clusters, cut_tree(tree, n_clusters=target)[:, 0],
                                                            classes, class_names)
    return found


def compare_measures(data: merges.ClusterData, classes: np.ndarray, class_names: list[str],
                     resamples: int) -> dict[str, Any]:
    """Greedy merge and hierarchy cut down to the class count, per measure; K estimates; timings."""
    target = len(class_names)
    table: dict[str, Any] = {}
    for measure in COMPARED:
        began = time.perf_counter()
        evidence = merges.gather_evidence(data, measure)
        result = merges.suggest(data, measure, resamples=resamples, evidence=evidence)
        seconds = time.perf_counter() - began
        greedy, plan = merges.greedy_merges(data, evidence, target)
        planned = planned_labels(data, merges.plan_merges(data, evidence, target))
        table[measure] = {"greedy": score(greedy, classes, class_names),
                          "plan_to_n": score(planned, classes, class_names),
                          "hierarchy_cut": score(cut_labels(result, data.labels, target), classes, class_names),
                          "k_estimate": {k: v for k, v in result.k_estimate.as_dict().items() if k != "modularity"},
                          "suggest_seconds": round(seconds, 2), "greedy_merges": plan}
    return table


def neighbours_sweep(data: merges.ClusterData, classes: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """The default measure's greedy merge and K estimate for several k of the kNN graph (its one parameter)."""
    found = {}
    for k in (5, 10, 20, 40):
        evidence = merges.gather_evidence(data, merges.DEFAULT_MEASURE, neighbours=k)
        merged, _ = merges.greedy_merges(data, evidence, len(class_names))
        estimate = merges.suggest(data, merges.DEFAULT_MEASURE, resamples=0, evidence=evidence).k_estimate
        found[f"k{k}"] = {**score(merged, classes, class_names), "k_estimate": estimate.k}
    return found


def k_estimate_only(data: merges.ClusterData, resamples: int) -> dict[str, Any]:
    result = merges.suggest(data, merges.DEFAULT_MEASURE, resamples=resamples)
    estimate = result.k_estimate.as_dict()
    return {"clusters": len(result.clusters), **{k: v for k, v in estimate.items() if k != "modularity"}}


def digits(runs: list[str], data: Path, work: Path, resamples: int) -> dict[str, Any]:
    """Each digits run as trained, and (K > 10) merged down to the 10 digits per measure: how much to over-cluster."""
    found: dict[str, Any] = {}
    for run in runs:
        k = trained_classes(Path(run))
        index = prepare_index(Path(run), data, work, f"digits_k{k}")
        clusters = merges.data_from_index(index)
        classes, names = index_classes(index, clusters)
        entry: dict[str, Any] = {"as_trained": score(clusters.labels, classes, names)}
        if k > len(names):
            entry["measures"] = compare_measures(clusters, classes, names, resamples)
            entry["oracle_merge_upper_bound"] = oracle_purity(clusters, classes, names)
            entry["k_estimate"] = entry["measures"][merges.DEFAULT_MEASURE]["k_estimate"]
            entry["variants"] = variants(clusters, classes, names)
        else:
            entry["k_estimate"] = k_estimate_only(clusters, resamples)
        found[f"k{k}"] = entry
    return found


def cifar(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work)
    k10 = prepare_index(Path(args.k10_run), Path(args.data), work, "k10")
    k30 = prepare_index(Path(args.k30_run), Path(args.data), work, "k30")
    data30, data10 = merges.data_from_index(k30), merges.data_from_index(k10)
    classes, names = index_classes(k30, data30)
    classes10, names10 = index_classes(k10, data10)
    measures = compare_measures(data30, classes, names, args.bootstrap)
    offered = measures[merges.DEFAULT_MEASURE]
    return {"k10": score(data10.labels, classes10, names10), "k30": score(data30.labels, classes, names),
            "k30_merged": {**offered["plan_to_n"], "measure": merges.DEFAULT_MEASURE,
                           "how": "twist suggest-merges --to 10: greedy merges of the top suggestion, then single "
                                  "clusters moved between groups while the kNN graph's modularity rises (no labels)",
                           "greedy_alone": offered["greedy"]},
            "measures": measures, "variants": variants(data30, classes, names),
            "k30_oracle_merge_upper_bound": oracle_purity(data30, classes, names),
            "neighbours_sweep": neighbours_sweep(data30, classes, names),
            "k_estimate_k10_run": k_estimate_only(data10, args.bootstrap),
            "runs": {"k10": str(Path(args.k10_run).resolve()), "k30": str(Path(args.k30_run).resolve())}}


def variants_summary(result: dict[str, Any]) -> dict[str, Any]:
    """Each variant's ACC / NMI on cifar10-test and every over-clustered digits run, and which of them beat the
    greedy merge on all of those at once (ACC and NMI both at least as good, one better)."""
    sets = {"cifar10_test": result["cifar10_test"]["variants"],
            **{f"digits_{k}": run["variants"] for k, run in result.get("digits", {}).items() if "variants" in run}}
    table = {name: {data: [found[name]["acc"], found[name]["nmi"]] for data, found in sets.items()}
             for name in sets["cifar10_test"]}
    soft = {name: {data: [found[name]["soft_topk_relabel"]["acc"], found[name]["soft_topk_relabel"]["nmi"]]
                   for data, found in sets.items()} for name in sets["cifar10_test"]}
    base = table["greedy_modularity"]

    def beats(scores: dict[str, list[float]]) -> bool:
        at_least = all(a >= b_acc and n >= b_nmi for (a, n), (b_acc, b_nmi) in
                       ((scores[d], base[d]) for d in scores))
        return at_least and any(scores[d] != base[d] for d in scores)

    return {"acc_nmi": table, "soft_topk_relabel_acc_nmi": soft,
            "beat_greedy_everywhere": [name for name, scores in table.items() if beats(scores)],
            "beat_greedy_on_cifar10_test": [name for name, scores in table.items()
                                            if scores["cifar10_test"][0] > base["cifar10_test"][0]]}


def notes(result: dict[str, Any]) -> str:
    """What the variants showed, in words, from the figures of this run."""
    merged, k10 = result["k30_merged"], result["k10"]
    verdict = "meets" if merged["acc"] >= k10["acc"] and merged["nmi"] >= k10["nmi"] else "misses"
    everywhere = ", ".join(result["variants_summary"]["beat_greedy_everywhere"]) or "none"
    return (f"k30_merged is what twist suggest-merges --to 10 prints (ACC {merged['acc']} / NMI {merged['nmi']}; "
            f"the greedy merges alone {merged['greedy_alone']['acc']} / {merged['greedy_alone']['nmi']}); it "
            f"{verdict} the K=10 run ({k10['acc']} / {k10['nmi']}). Variants at least as good as the greedy merge "
            f"on cifar10-test and every over-clustered digits run: {everywhere}"
            "; the others that beat it on cifar10-test lose on the digits (variants_summary). The soft re-labelling "
            "(summed top-10 probability per group) is reported per variant but not offered: the app merges whole "
            "clusters, and it did not help.")


def over_scores(over_run: Path, data: Path, work: Path, name: str, resamples: int) -> dict[str, Any]:
    """An over-clustered run as trained and merged down to the classes by the ``--to N`` plan (no labels), with
    the balanced plans, the label-using ceiling and the K estimate. Its index goes to ``work/<name>_index``."""
    over = trained_classes(over_run)
    index = prepare_index(over_run, data, work, name)
    clustered = merges.data_from_index(index)
    classes, names = index_classes(index, clustered)
    plan = merges.plan_merges(clustered, merges.gather_evidence(clustered, merges.DEFAULT_MEASURE), len(names))
    return {f"k{over}": score(clustered.labels, classes, names),
            f"k{over}_merged": score(planned_labels(clustered, plan), classes, names),
            f"k{over}_oracle_merge_upper_bound": oracle_purity(clustered, classes, names),
            **{f"k{over}_balanced_plan[beta={beta}]": score(group_of[np.searchsorted(leaves, clustered.labels)],
                                                            classes, names)
               for beta in BALANCE_BETAS for leaves, group_of in [balanced_plan(clustered, len(names), beta)]},
            "k_estimate": k_estimate_only(clustered, resamples)}


def pair_scores(run: Path, over_run: Path, data: Path, work: Path, label: str, resamples: int) -> dict[str, Any]:
    """One data set's headline pair: the run trained with the class count as trained, and the over-clustered
    run scored by :func:`over_scores`. Their indexes go to ``work/k<K><label>_index``."""
    k, over = trained_classes(run), trained_classes(over_run)
    plain_index = prepare_index(run, data, work, f"k{k}{label}")
    plain = merges.data_from_index(plain_index)
    plain_classes, plain_names = index_classes(plain_index, plain)
    return {f"k{k}": score(plain.labels, plain_classes, plain_names),
            **over_scores(over_run, data, work, f"k{over}{label}", resamples),
            "runs": {f"k{k}": str(run.resolve()), f"k{over}": str(over_run.resolve())},
            "recipes": {f"k{k}": recipe(run), f"k{over}": recipe(over_run)}}


VARIED = ("lam2", "tau")  # the recipe settings a variant run may change
PATCHES_DEFAULTS = {"lam2": 1.0, "tau": 1.0}  # twist train's values for patches, as the runs of other_seeds used


def add_variant_run(args: argparse.Namespace) -> None:
    """Score one over-clustered cifar10-test run trained with another ``--lam2`` (the diversity weight) or
    ``--tau`` into ``recipe_variants`` of merge.json, beside the K=10 run of the same seed already in the file."""
    name, run = args.variant_run[0], Path(args.variant_run[1])
    config = json.loads((run / "config.json").read_text())
    saved = json.loads((RESULTS / "merge.json").read_text())
    found = {**{key: config[key] for key in VARIED}, "seed": config["seed"],
             "self_label_fraction": config["self_label_fraction"], "epochs": config["epochs"],
             **over_scores(run, Path(args.data), Path(args.work), name, args.bootstrap), "run": str(run.resolve())}
    section = saved.setdefault("recipe_variants", {"runs": {}})
    section["runs"][name] = found
    over = trained_classes(run)
    section["summary"] = [
        {"run": key, **{v: entry[v] for v in VARIED}, "seed": entry["seed"], "merged": entry[f"k{over}_merged"],
         "ceiling_acc": entry[f"k{over}_oracle_merge_upper_bound"]["acc"]}
        for key, entry in sorted(section["runs"].items(),
                                 key=lambda item: (item[1]["seed"], *(-item[1][v] for v in VARIED)))]
    default = saved.get("other_seeds", {}).get("seed0_no_self_labelling")
    if default:  # the same recipe with the default weight and temperature, scored by --another-seed
        section["summary"].insert(0, {"run": "other_seeds.seed0_no_self_labelling", **PATCHES_DEFAULTS, "seed": 0,
                                      "merged": default["k30_merged"],
                                      "ceiling_acc": default["k30_oracle_merge_upper_bound"]["acc"]})
    section["k10_same_recipe"] = {"seed0": default["k10"]} if default else {}
    print(json.dumps(found, indent=2))
    print(f"wrote {save('merge', saved)}")


def saved_pair(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """merge.json as saved, and its pair ``name`` of ``other_seeds`` (which the runs scored beside it need)."""
    saved = json.loads((RESULTS / "merge.json").read_text())
    pair = saved.get("other_seeds", {}).get(name)
    if not pair:
        raise SystemExit(f"no pair {name} in other_seeds of merge.json: score it first with --another-seed {name}")
    return saved, pair


def mean_scores(entries: list[dict[str, Any]], part: str) -> dict[str, float]:
    """Mean ACC and NMI of ``part`` over ``entries``."""
    return {m: round(float(np.mean([e[part][m] for e in entries])), 4) for m in ("acc", "nmi")}


def add_other_k(args: argparse.Namespace) -> None:
    """Score an over-clustered cifar10-test run of another K (same recipe and seed as the pair ``NAME`` of
    ``other_seeds``) into ``other_k``, with the pair's K=10 and K=30 results beside it; ``other_k_summary``
    compares them per K over the pairs scored: how much to over-cluster, measured on cifar10-test."""
    name, run = args.other_k[0], Path(args.other_k[1])
    saved, _ = saved_pair(name)
    over = trained_classes(run)
    found = {**over_scores(run, Path(args.data), Path(args.work), f"k{over}_{name}", args.bootstrap),
             "pair": name, "run": str(run.resolve()), "recipe": recipe(run)}
    section = saved.setdefault("other_k", {})
    section[f"{name}_k{over}"] = found
    summary = {}
    for entry in section.values():
        k = next(key for key in entry if key.endswith("_merged"))
        summary.setdefault(k, []).append(entry)

    saved["other_k_summary"] = {
        k: {"pairs": [e["pair"] for e in entries], k: mean_scores(entries, k),
            "k10": mean_scores([saved["other_seeds"][e["pair"]] for e in entries], "k10"),
            "k30_merged": mean_scores([saved["other_seeds"][e["pair"]] for e in entries], "k30_merged")}
        for k, entries in summary.items()}
    print(json.dumps(found, indent=2))
    print(f"wrote {save('merge', saved)}")


def coarse_assignments(index: Path, data: merges.ClusterData) -> np.ndarray:
    """Each image's cluster in the first coarse head of the index's model, one clean pass (as the head graph)."""
    from twist_core.curate.view_graph import decoded_crops, open_model

    root, model_path, sha, paths = merges.source_images(index)
    model = open_model(str(model_path), sha)
    files = [paths[int(i)] for i in data.ids]
    found = np.full(len(files), -1)
    for positions, crops in decoded_crops(model, root, files):
        found[positions] = model.predict_heads(model.transform.normalize(crops.numpy()))[1][0].argmax(1)
    return found


def add_coarse_run(args: argparse.Namespace) -> None:
    """Score an over-clustered cifar10-test run trained with ``--coarse-classes`` (seed and recipe of the pair
    ``NAME`` of ``other_seeds``) into ``coarse_heads``: merged to the classes by ``twist suggest-merges --measure
    heads --to 10`` and by the default kNN plan, its coarse head as it stands, beside the pair's K=10 run;
    ``coarse_heads_summary`` has the means over the runs scored."""
    name, run = args.coarse_run[0], Path(args.coarse_run[1])
    saved, pair = saved_pair(name)
    over = trained_classes(run)
    work_name = f"k{over}_coarse_{name}"
    found = over_scores(run, Path(args.data), Path(args.work), work_name, args.bootstrap)
    index = Path(args.work) / f"{work_name}_index"
    clustered = merges.data_from_index(index)
    classes, names = index_classes(index, clustered)
    shares = merges.model_evidence(index, clustered, merges.HEADS, progress=False)
    evidence = merges.gather_evidence(clustered, merges.HEADS, coarse_shares=shares)
    heads = merges.suggest(clustered, merges.HEADS, resamples=args.bootstrap, evidence=evidence, to=len(names))
    config = json.loads((run / "config.json").read_text())
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    found = {f"k{over}_heads_merged": {**score(planned_labels(clustered, heads.plan), classes, names),
                                       "plan": heads.plan.as_dict()},
             f"k{over}_knn_merged": found.pop(f"k{over}_merged"),
             "coarse_head": score(coarse_assignments(index, clustered), classes, names),
             "k_estimate_heads": {k: v for k, v in heads.k_estimate.as_dict().items() if k != "modularity"},
             **found, "k10_of_the_pair": pair["k10"], "coarse_classes": config["coarse_classes"],
             "run": str(run.resolve()), "recipe": recipe(run), "run_seconds": round(last["run_seconds"], 1)}
    section = saved.setdefault("coarse_heads", {})
    section[name] = found

    entries = list(section.values())
    ceiling = [e[f"k{over}_oracle_merge_upper_bound"]["acc"] for e in entries]
    summary = {"pairs": list(section), f"k{over}_heads_merged": mean_scores(entries, f"k{over}_heads_merged"),
               "k10": mean_scores(entries, "k10_of_the_pair"),
               f"k{over}_knn_merged": mean_scores(entries, f"k{over}_knn_merged"),
               "coarse_head": mean_scores(entries, "coarse_head"), "ceiling_acc": round(float(np.mean(ceiling)), 4),
               "heads_merged_minus_k10_per_pair": [
                   {m: round(e[f"k{over}_heads_merged"][m] - e["k10_of_the_pair"][m], 4) for m in ("acc", "nmi")}
                   for e in entries]}
    summary["merged_at_least_k10_on_mean"] = all(summary[f"k{over}_heads_merged"][m] >= summary["k10"][m]
                                                 for m in ("acc", "nmi"))
    saved["coarse_heads_summary"] = summary
    # the headline pair becomes the recommended recipe's means; the first seed's pair without coarse heads stays
    if "first_pair" not in saved:
        saved["first_pair"] = {"k10": saved["k10"], "k30_merged": saved["k30_merged"], "notes": saved.get("notes"),
                               "how": "seed 0, patches, no coarse heads: k30_merged by suggest-merges --to 10"}
    saved["notes"] = ("k10 and k30_merged are means over the coarse_heads seeds (K=30 with a coarse K=10 head, "
                      "merged by --measure heads, against K=10 runs of the same seeds and epochs); the first pair's "
                      "figures and notes, without coarse heads, are under first_pair")
    saved["k10"] = {**summary["k10"], "how": "mean of the K=10 runs of the same seeds (patches-conv, 58 epochs)",
                    "seeds": summary["pairs"]}
    saved["k30_merged"] = {**summary[f"k{over}_heads_merged"], "clusters": 10, "seeds": summary["pairs"],
                           "how": f"mean over seeds: --classes {over} --coarse-classes {config['coarse_classes']}, "
                                  "merged by twist suggest-merges --measure heads --to 10 (no labels)"}
    print(json.dumps({k: v for k, v in found.items() if k != f"k{over}_heads_merged"}, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"wrote {save('merge', saved)}")


def seed_means(other_seeds: dict[str, Any]) -> dict[str, Any]:
    """Per backbone, over the seeds of pairs whose recipes are recorded: the mean K=10 and merged K=30 scores,
    so that a difference can be read against the spread between seeds."""
    by_backbone: dict[str, list[dict[str, Any]]] = {}
    for name, entry in sorted(other_seeds.items()):
        if "recipes" in entry:
            by_backbone.setdefault(entry["recipes"]["k10"]["backbone"], []).append({"pair": name, **entry})

    def mean(entries: list[dict[str, Any]], key: str, measure: str) -> float:
        return round(float(np.mean([entry[key][measure] for entry in entries])), 4)

    summary = {}
    for backbone, entries in by_backbone.items():
        over = next(key for key in entries[0] if key.endswith("_merged"))
        ceiling = over.replace("_merged", "_oracle_merge_upper_bound")
        k10 = {m: mean_scores(entries, "k10", m) for m in ("acc", "nmi")}
        merged = {m: mean_scores(entries, over, m) for m in ("acc", "nmi")}
        summary[backbone] = {
            "pairs": [entry["pair"] for entry in entries], "k10": k10, over: merged,
            "ceiling_acc": mean_scores(entries, ceiling, "acc"),
            "merged_minus_k10_per_pair": [{m: round(entry[over][m] - entry["k10"][m], 4) for m in ("acc", "nmi")}
                                          for entry in entries],
            "merged_at_least_k10_on_mean": all(merged[m] >= k10[m] for m in ("acc", "nmi"))}
    return summary


def add_pair(args: argparse.Namespace) -> None:
    """Score one more pair (another seed of cifar10-test, or caltech20) into the existing merge.json, keeping the
    rest of the file: under ``other_seeds`` or ``caltech20``, its K estimate under ``k_estimates``."""
    saved = json.loads((RESULTS / "merge.json").read_text())
    if args.another_seed:
        over_run = Path(args.k30_run)
        found = pair_scores(Path(args.k10_run), over_run, Path(args.data), Path(args.work),
                            f"_{args.another_seed}", args.bootstrap)
        saved.setdefault("other_seeds", {})[args.another_seed] = found
        saved["other_seeds_means"] = seed_means(saved["other_seeds"])
        estimate = f"cifar10_test_k{trained_classes(over_run)}_{args.another_seed}"
    else:
        over_run = Path(args.caltech_pair[1])
        found = pair_scores(Path(args.caltech_pair[0]), over_run, Path(args.caltech_data), Path(args.work),
                            "_caltech20", args.bootstrap)
        saved["caltech20"] = found
        estimate = f"caltech20_k{trained_classes(over_run)}"
    saved["k_estimates"][estimate] = found["k_estimate"]
    print(json.dumps(found, indent=2))
    print(f"wrote {save('merge', saved)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k10-run")
    parser.add_argument("--k30-run")
    parser.add_argument("--data", help="cifar10-test class folders (scoring only)")
    parser.add_argument("--digits-runs", nargs="*", default=[], help="runs on the digits of twist demo, any K")
    parser.add_argument("--digits-data", help="the digits folder of those runs")
    parser.add_argument("--caltech-labels", help="labels table of a trained caltech20 model (twist label)")
    parser.add_argument("--work", default="bench_work/merge", help="exports, labels and indexes go here")
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--another-seed", help="NAME: score only this K=10/K=30 pair (runs of another seed or "
                                               "backbone; each run's recipe is recorded)")
    parser.add_argument("--caltech-pair", nargs=2, metavar=("RUN", "OVER_RUN"),
                        help="score only caltech20: a run with K = 20 and an over-clustered one")
    parser.add_argument("--caltech-data", help="the caltech20 class folders of --caltech-pair (scoring only)")
    parser.add_argument("--variant-run", nargs=2, metavar=("NAME", "OVER_RUN"),
                        help="score only this over-clustered cifar10-test run (another --lam2 or --tau) under "
                             "recipe_variants")
    parser.add_argument("--other-k", nargs=2, metavar=("NAME", "OVER_RUN"),
                        help="score only this over-clustered cifar10-test run of another K (the seed and recipe of "
                             "the pair NAME) under other_k")
    parser.add_argument("--coarse-run", nargs=2, metavar=("NAME", "OVER_RUN"),
                        help="score only this over-clustered cifar10-test run with --coarse-classes (the seed and "
                             "recipe of the pair NAME) under coarse_heads")
    args = parser.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.coarse_run:
        if not args.data:
            parser.error("--coarse-run needs --data")
        add_coarse_run(args)
        return
    if args.other_k:
        if not args.data:
            parser.error("--other-k needs --data")
        add_other_k(args)
        return
    if args.variant_run:
        if not args.data:
            parser.error("--variant-run needs --data")
        add_variant_run(args)
        return
    if args.caltech_pair:
        if not args.caltech_data:
            parser.error("--caltech-pair needs --caltech-data")
        add_pair(args)
        return
    if not (args.k10_run and args.k30_run and args.data):
        parser.error("--k10-run, --k30-run and --data are required (or --caltech-pair)")
    if args.another_seed:
        add_pair(args)
        return
    began = time.perf_counter()
    result: dict[str, Any] = {"cifar10_test": cifar(args)}
    result["k10"], result["k30_merged"] = result["cifar10_test"]["k10"], result["cifar10_test"]["k30_merged"]
    estimates: dict[str, Any] = {
        "cifar10_test_k30": result["cifar10_test"]["measures"][merges.DEFAULT_MEASURE]["k_estimate"]}
    if args.digits_runs and args.digits_data:
        result["digits"] = digits(args.digits_runs, Path(args.digits_data), Path(args.work), args.bootstrap)
        estimates.update({f"digits_{name}": run["k_estimate"] for name, run in result["digits"].items()})
    if args.caltech_labels:
        estimates["caltech20_k20"] = k_estimate_only(merges.data_from_table(Path(args.caltech_labels)),
                                                     args.bootstrap)
    result["k_estimates"] = estimates
    result["variants_summary"] = variants_summary(result)
    result["notes"] = notes(result)
    result["conditions"] = {
        "data": "cifar10-test, 10,000 images, 10 classes; labels (folder names) used only for scoring",
        "k10_run": "patches backbone, 20-minute CPU time budget (96 epochs)",
        "k30_run": "same recipe with --classes 30 --epochs 96 (the epochs the K=10 run fit in 20 minutes)",
        "digits": "scikit-learn digits (1,797 images, 16 px) of twist demo, patches backbone, --epochs 30 per K",
        "caltech20": "the shipped photo default's K=20 run (15-minute budget) for the K estimate; the over-clustered "
                     "pair (K=20 and K=60, 172 epochs each) is under caltech20 (--caltech-pair)",
        "suggestions": "index of the run's ONNX model; kNN graph k=10 over all images; average linkage on "
                       "1 - similarity; K estimate = most modular cut of the hierarchy, bootstrap "
                       f"{args.bootstrap} resamples", "machine": machine(),
        "seconds": round(time.perf_counter() - began, 1)}
    previous = RESULTS / "merge.json"  # what the other modes and bench/merge_selftrain.py added stays
    if previous.is_file():
        saved = json.loads(previous.read_text())
        result = {**result, **{k: v for k, v in saved.items() if k not in result}}
        result["k_estimates"] = {**saved.get("k_estimates", {}), **estimates}
    print(json.dumps({k: result[k] for k in ("k10", "k30_merged", "k_estimates")}, indent=2))
    print(f"wrote {save('merge', result)}")


if __name__ == "__main__":
    main()
