"""The end of a training run: ``RUN/summary.json`` (what actually ran) and the lines ``twist train`` and
``twist finetune`` print from it.

config.json keeps the options as given, so that ``--resume`` and ``twist train --config RUN/config.json``
run the same recipe; under ``--time-budget`` its ``epochs`` is the length asked, not the length that fitted.
What ran (epochs, steps, images, time, the final metrics) is recorded here instead, in a file of its own that
neither reads.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from twist_core.evaluation.evaluate import summary_line
from twist_core.io_utils import atomic_write_text
from twist_core.layout import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    CURVES_FILE,
    DONE_FILE,
    METRICS_FILE,
    SKIPPED_FILE,
    SUMMARY_FILE,
)
from twist_core.report import Written, print_written
from twist_core.train.budget import format_duration

RUN_FILES = (
    (CONFIG_FILE, "the options as given, every auto resolved (twist train --config reproduces the recipe)"),
    (METRICS_FILE, "one row of losses and scores per epoch"),
    (CURVES_FILE, "the training curves"),
    (CHECKPOINT_FILE, "the checkpoint that twist export and --resume read"),
    (SKIPPED_FILE, "images and folders that could not be read (empty: none)"),
    (SUMMARY_FILE, "what ran: epochs, steps, images seen, time, final metrics"),
    (DONE_FILE, "the final epoch's metrics: the run is complete"),
)


def run_summary(config: Any, metrics: dict[str, Any], steps: int, global_batch: int, seconds: float
                ) -> dict[str, Any]:
    """What ran, as opposed to what was asked: the epochs begun (the last one may be cut short by a time
    budget), the steps and images (steps x global batch) and the time; ``config`` is the run's TrainConfig."""
    return {"epochs_run": int(metrics.get("epoch", 0)), "epochs_asked": config.epochs,
            "time_budget": config.time_budget, "steps": steps, "images_seen": steps * global_batch,
            "seconds": round(seconds, 1), "final": metrics}


def write_run_summary(out: Path, summary: dict[str, Any]) -> None:
    atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """What ran in two or three lines: length (and what decided it), then the final metrics."""
    length = (f"trained {summary['epochs_run']} epochs ({summary['steps']:,} steps, {summary['images_seen']:,} "
              f"images seen) in {format_duration(summary['seconds'])}")
    if summary["time_budget"]:
        length += (f": the time budget {summary['time_budget']} set the length (config.json's epochs "
                   f"{summary['epochs_asked']} is the length asked; summary.json records what ran)")
    final = summary["final"]
    lines = [length]
    if "loss" in final:
        lines.append(f"final: loss {final['loss']:.3f}, {final['clusters_in_use']} clusters in use, "
                     f"{final['images_per_s']:.0f} images/s in the last epoch")
    if final.get("eval"):
        lines.append(f"final eval: {summary_line(final['eval'])}")
    return lines


def print_run_end(out: Path, extra: Iterable[Written] = ()) -> None:
    """The summary of the run in ``out`` (from its summary.json), its files, and the command to export it."""
    summary = json.loads((out / SUMMARY_FILE).read_text())
    print("\n".join([*summary_lines(summary), f"run folder: {out}"]), flush=True)
    print_written([*((out / name, what) for name, what in RUN_FILES), *extra],
                  next_step=f"twist export {out} --out {out.name}.onnx")
