"""The self-labelling stage on or off: trained runs that differ only in ``--self-label-fraction``, side by side.

Each pair is a run with the stage (``--self-label-fraction 0.1``: the last 10 % of the steps; the stage is off
by default) and the same command with ``--self-label-fraction 0``; the script checks that the two configs differ
in nothing else (output folder aside), reads each run's final evaluation (``twist train --eval-data``: ACC / NMI /
ARI / kNN on the class folders) and the last evaluation before the stage began,
and writes bench/results/self_label.json.

    python -m bench.self_label --pair NAME RUN_WITH_STAGE RUN_WITHOUT [--pair ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.common import machine, save

SAME_EXCEPT = {"out", "self_label_fraction"}


def final_and_before_stage(run: Path) -> dict[str, Any]:
    """The run's last evaluation, and its last one before the self-labelling stage (None without a stage)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evaluated = [r for r in records if r.get("eval")]
    before = [r for r in evaluated if not r.get("self_labelling")]
    last = evaluated[-1]

    def scores(record: dict[str, Any]) -> dict[str, Any]:
        found = record["eval"]
        return {"epoch": record["epoch"], **{k: round(found[k], 4) for k in ("acc", "nmi", "ari", "knn_acc")}}

    staged = any(r.get("self_labelling") for r in records)
    return {"final": scores(last), "before_stage": scores(before[-1]) if staged and before else None,
            "seconds": round(last["run_seconds"]), "run": str(run.resolve())}


def compare(with_stage: Path, without: Path) -> dict[str, Any]:
    configs = [json.loads((run / "config.json").read_text()) for run in (with_stage, without)]
    differ = sorted(k for k in configs[0].keys() | configs[1].keys()
                    if configs[0].get(k) != configs[1].get(k) and k not in SAME_EXCEPT)
    if differ:
        raise SystemExit(f"{with_stage} and {without} differ in more than the stage: {differ}")
    found = {"with_stage": final_and_before_stage(with_stage), "without_stage": final_and_before_stage(without)}
    a, b = found["with_stage"]["final"], found["without_stage"]["final"]
    found["without_minus_with"] = {k: round(b[k] - a[k], 4) for k in ("acc", "nmi", "ari", "knn_acc")}
    found["self_label_fraction"] = configs[0]["self_label_fraction"]
    found["recipe"] = {k: configs[0][k] for k in ("backbone", "classes", "epochs", "image_size", "seed", "data")}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", nargs=3, action="append", required=True,
                        metavar=("NAME", "RUN_WITH_STAGE", "RUN_WITHOUT"))
    args = parser.parse_args()
    pairs = {name: compare(Path(with_stage), Path(without)) for name, with_stage, without in args.pair}
    gains = [p["without_minus_with"]["acc"] for p in pairs.values()]
    result = {"pairs": pairs, "acc_gain_without_stage": gains,
              "conditions": {"epochs": "fixed per pair (the epochs the default's time budget fit), so load on the "
                                       "machine does not change the figures", "machine": machine()}}
    print(json.dumps({name: p["without_minus_with"] for name, p in pairs.items()}, indent=2))
    print(f"wrote {save('self_label', result)}")


if __name__ == "__main__":
    main()
