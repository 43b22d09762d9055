"""How well the review queue finds mistakes: precision of its top N against confidence and margin alone.

A "mistake" is an image whose cluster differs from its class's majority cluster (class = first folder of its
path; the folders are used for scoring only). The pipeline is the real one: ``twist export`` of a trained run,
``twist label`` of the folder (which writes the ``review_score`` column), ``twist index`` (which stores the
scores). Every variant of the score (k, neighbour weighting, margin weight) is computed from the same table
and embeddings with :mod:`twist_core.label.review`, so the shipped default is chosen by this measurement.

    python -m bench.review --run RUN --data FOLDER --work DIR [--check-table OTHER_LABELS.csv]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import REPO, machine, save
from twist_core.index import review_table
from twist_core.index.metadata import meta_path
from twist_core.label import review
from twist_core.label.table import labels_paths, read_labels
from twist_core.vectors import IndexPlan, build, normalized

KS = (5, 10, 20, 50)
NEIGHBOUR_WEIGHTS = (0.0, 0.1, 0.2, 0.33, 0.5, 0.75, 1.0)
CLUSTER_SHARES = (0.0, 0.5)
MIN_NEIGHBOUR_WEIGHT = 0.1  # the choice keeps the neighbour term: it alone finds confident mistakes
CHECK_TOP = 200  # 10 % of caltech20, as 500 is 5 % of cifar10-test


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "twist_core.cli", *command], cwd=REPO, check=True)
    return round(time.perf_counter() - start, 1)


def pipeline(run: Path, data: Path, work: Path) -> dict[str, float]:
    """Export, label and index (each step skipped when its output exists); seconds per step run."""
    work.mkdir(parents=True, exist_ok=True)
    seconds = {}
    model, table, index = work / "model.onnx", work / "labels.csv", work / "index"
    if not model.is_file():
        seconds["export"] = timed(["export", str(run), "--out", str(model)])
    if not table.is_file():
        seconds["label"] = timed(["label", str(model), str(data), "--out", str(table), "--no-progress"])
    if not (index / "manifest.json").is_file():
        seconds["index"] = timed(["index", str(table), "--out", str(index), "--device", "cpu"])
    return seconds


class Table:
    """One labelled table with its truth: clusters, margins, confidences, embeddings, mistakes."""

    def __init__(self, path: Path) -> None:
        rows, _ = read_labels(path)
        good = [i for i, r in enumerate(rows) if not r["error"]]
        self.rows = [rows[i] for i in good]
        self.paths = [r["path"] for r in self.rows]
        self.clusters = np.array([r["cluster"] for r in self.rows], np.int64)
        self.margins = np.array([r["margin"] for r in self.rows], np.float32)
        self.confidence = np.array([r["confidence"] for r in self.rows], np.float32)
        self.column = np.array([np.nan if r.get("review_score") is None else r["review_score"] for r in self.rows],
                               np.float32)
        embeddings = np.load(labels_paths(path)[0])[good]
        classes = np.array([p.split("/")[0] for p in self.paths])
        majority = {c: int(np.bincount(self.clusters[classes == c]).argmax()) for c in set(classes.tolist())}
        self.majority = np.array([majority[c] for c in classes])
        self.mistake = self.clusters != self.majority
        self.ids = np.arange(len(self.rows), dtype=np.int64)
        self.index = build(IndexPlan("flat"), embeddings.shape[1], len(self.ids),
                           lambda: iter([(self.ids, normalized(embeddings))]), None)

    def precision(self, score: np.ndarray, top: int) -> float:
        """Share of mistakes among the ``top`` highest scores (ties broken by row order)."""
        return round(float(self.mistake[np.argsort(-score, kind="stable")[:top]].mean()), 4)


def variants(table: Table, tops: tuple[int, ...]) -> dict[tuple, dict[str, float]]:
    """Precision at each ``top`` for every (k, weighting, neighbour weight, cluster share)."""
    found = {}
    for k in KS:
        for weighting in review.WEIGHTINGS:
            votes = review.neighbour_votes(table.index, table.ids, table.clusters, k, weighting)
            for neighbour_weight in NEIGHBOUR_WEIGHTS:
                for share in CLUSTER_SHARES:
                    settings = review.ReviewSettings(k, weighting, neighbour_weight, share)
                    score = review.combine(votes.agreement, table.margins, table.clusters, settings)
                    found[(k, weighting, neighbour_weight, share)] = {f"p@{t}": table.precision(score, t)
                                                                     for t in tops}
    return found


def choose(main: dict[tuple, dict[str, float]], check: dict[tuple, dict[str, float]], top: int) -> tuple:
    """The variant with the best mean of the main table's P@top and the check table's P@CHECK_TOP."""
    allowed = [key for key in main if key[2] >= MIN_NEIGHBOUR_WEIGHT]
    return max(allowed, key=lambda key: main[key][f"p@{top}"] + check[key][f"p@{CHECK_TOP}"])


def baselines(table: Table, tops: tuple[int, ...]) -> dict[str, Any]:
    return {"mistakes": int(table.mistake.sum()), "images": len(table.rows),
            "base_rate": round(float(table.mistake.mean()), 4),
            "confidence_lowest_first": {f"p@{t}": table.precision(-table.confidence, t) for t in tops},
            "margin_lowest_first": {f"p@{t}": table.precision(-table.margins, t) for t in tops}}


def shipped(table: Table, index_dir: Path, tops: tuple[int, ...]) -> dict[str, Any]:
    """The default as written by twist label (column) and by twist index (review table), and its suggestions."""
    import sqlite3

    meta = meta_path(index_dir)
    with sqlite3.connect(f"file:{meta}?mode=ro", uri=True) as db:
        stored = dict(db.execute("SELECT i.path, r.score FROM review r JOIN images i ON i.id = r.id").fetchall())
        suggestions = dict(db.execute("SELECT i.path, r.suggestion FROM review r JOIN images i ON i.id = r.id"))
    index_score = np.array([stored[p] for p in table.paths], np.float32)
    top = np.argsort(-index_score, kind="stable")[:max(tops)]
    caught = top[table.mistake[top]]
    right = [suggestions[table.paths[i]] == table.majority[i] for i in caught]
    return {"settings": {"k": review.K_NEIGHBOURS, "weighting": review.WEIGHTING,
                         "neighbour_weight": review.NEIGHBOUR_WEIGHT, "cluster_share": review.CLUSTER_SHARE},
            "label_column": {f"p@{t}": table.precision(table.column, t) for t in tops},
            "index_table": {f"p@{t}": table.precision(index_score, t) for t in tops},
            f"suggestion_is_majority_cluster_among_mistakes_in_top_{max(tops)}": round(float(np.mean(right)), 4)}


def timing_of_refresh(index_dir: Path) -> float:
    start = time.perf_counter()
    review_table.refresh_index(index_dir)
    return round(time.perf_counter() - start, 2)


def named(key: tuple, **metrics: dict[str, float]) -> dict[str, Any]:
    k, weighting, neighbour_weight, share = key
    return {"k": k, "weighting": weighting, "neighbour_weight": neighbour_weight, "cluster_share": share, **metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("/work/bench_runs/cifar_patches_final"))
    parser.add_argument("--data", type=Path, default=Path("/work/bench_runs/data/test"))
    parser.add_argument("--work", type=Path, default=Path("/work/bench_runs/i14r"))
    parser.add_argument("--top", type=int, default=500)
    parser.add_argument("--check-table", type=Path, default=Path("/work/bench_runs/cal_labels.csv"),
                        help="a second labels table (class folders) on which the choice is checked")
    args = parser.parse_args()
    tops = (100, args.top, 2 * args.top)
    check_tops = (100, CHECK_TOP, 500)
    seconds = pipeline(args.run, args.data, args.work)
    table, check = Table(args.work / "labels.csv"), Table(args.check_table)
    found, check_found = variants(table, tops), variants(check, check_tops)
    chosen = choose(found, check_found, args.top)
    plain = max((key for key in found if key[2] == 0.0),
                key=lambda key: found[key][f"p@{args.top}"] + check_found[key][f"p@{CHECK_TOP}"])
    shipped_key = (review.K_NEIGHBOURS, review.WEIGHTING, review.NEIGHBOUR_WEIGHT, review.CLUSTER_SHARE)
    result: dict[str, Any] = {
        "what": f"precision of the top {args.top} of the review queue at finding images whose cluster differs from "
                "their class's majority cluster (cifar10-test, the 20-minute CPU patches model, K=10); the check "
                f"table (caltech20, the shipped photo model) at its top {CHECK_TOP}",
        "run": str(args.run), "data": str(args.data), "check_table": str(args.check_table),
        "eval_acc": json.loads((args.run / "eval.json").read_text())["acc"],
        "seconds": {**seconds, "review_refresh_of_index": timing_of_refresh(args.work / "index")},
        "baselines": baselines(table, tops), "check_baselines": baselines(check, check_tops),
        "choice_rule": f"best mean of P@{args.top} (cifar) and P@{CHECK_TOP} (caltech) among variants with a "
                       f"neighbour weight of at least {MIN_NEIGHBOUR_WEIGHT}",
        "chosen": named(chosen, cifar=found[chosen], caltech=check_found[chosen]),
        "chosen_is_shipped": chosen == shipped_key,
        "best_without_neighbours": named(plain, cifar=found[plain], caltech=check_found[plain]),
        "shipped": shipped(table, args.work / "index", tops),
        "variants": [named(key, cifar=found[key], caltech=check_found[key]) for key in found],
        "machine": machine()}
    print(json.dumps({k: v for k, v in result.items() if k != "variants"}, indent=2))
    print(save("review", result))


if __name__ == "__main__":
    main()
