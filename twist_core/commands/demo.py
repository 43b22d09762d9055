"""``twist demo``: the whole pipeline on scikit-learn's digits (``twist_core.demo``), then the app."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from twist_core.cli import commands
from twist_core.commands import run_command
from twist_core.config import command_parser
from twist_core.demo import DemoConfig, run_demo
from twist_core.demo import __doc__ as DOC
from twist_core.outputs import WORKSPACE, Output, check_outputs
from twist_core.report import Written, print_written


def build_parser() -> argparse.ArgumentParser:
    return command_parser("twist demo", DOC, DemoConfig)


def demo(config: DemoConfig) -> int:
    check_outputs([Output("--workspace", config.workspace, WORKSPACE)])
    summary = run_demo(config)
    pixels = summary["kmeans_pixels"]
    print(f"\nTWIST on the digits: ACC {summary['acc']:.3f} NMI {summary['nmi']:.3f} ARI {summary['ari']:.3f}   "
          f"(k-means on raw pixels: ACC {pixels['acc']:.3f} NMI {pixels['nmi']:.3f} ARI {pixels['ari']:.3f})")
    app = commands().get("app")  # registered by the app package (an entry point), never imported by name here
    open_app = f"twist app --model {summary['model']} --index {summary['index']}"
    print_written(workspace_files(summary), next_step=None if config.app and app else open_app + (
        "" if app else "   (once the app is installed: pip install -e .)"))
    print(f"remove the workspace (everything above) with: rm -rf {summary['workspace']}")
    if not config.app or app is None:
        return 0
    return importlib.import_module(app.module).main(
        ["--model", summary["model"], "--index", summary["index"], "--port", str(config.port)])


def workspace_files(summary: dict) -> list[Written]:
    """What the demo wrote into its workspace, each step's result."""
    workspace = Path(summary["workspace"])
    return [(workspace / "digits", "the 1,797 digits as PNGs, one folder per digit"),
            (workspace / "run", "the training run (twist train)"),
            (summary["model"], "the exported model (twist export)"),
            (Path(summary["model"]).with_suffix(".json"), "its model card"),
            (summary["labels"], "every digit's cluster (twist label)"),
            (summary["index"], "the similarity index the app opens (twist index)"),
            (workspace / "eval.json", "the scores against the true digits (twist eval)"),
            (workspace / "eval.png", "the confusion matrix"),
            (workspace / "demo.json", "the demo's scores and step times")]


def main(argv: list[str] | None = None) -> int:
    return run_command("twist demo", build_parser(), DemoConfig, argv, demo)


if __name__ == "__main__":
    sys.exit(main())
