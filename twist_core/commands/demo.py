"""``twist demo``: the whole pipeline on scikit-learn's digits (``twist_core.demo``), then the app."""

from __future__ import annotations

import argparse
import importlib
import sys

from twist_core.cli import commands
from twist_core.commands import run_command
from twist_core.config import command_parser
from twist_core.demo import DemoConfig, run_demo
from twist_core.demo import __doc__ as DOC
from twist_core.outputs import WORKSPACE, Output, check_outputs


def build_parser() -> argparse.ArgumentParser:
    return command_parser("twist demo", DOC, DemoConfig)


def demo(config: DemoConfig) -> int:
    check_outputs([Output("--workspace", config.workspace, WORKSPACE)])
    summary = run_demo(config)
    pixels = summary["kmeans_pixels"]
    print(f"\nTWIST on the digits: ACC {summary['acc']:.3f} NMI {summary['nmi']:.3f} ARI {summary['ari']:.3f}   "
          f"(k-means on raw pixels: ACC {pixels['acc']:.3f} NMI {pixels['nmi']:.3f} ARI {pixels['ari']:.3f})")
    app = commands().get("app")  # registered by the app package (an entry point), never imported by name here
    if not config.app or app is None:
        print(f"workspace: {summary['workspace']}\nopen the app with: twist app --model {summary['model']} "
              f"--index {summary['index']}" + ("" if app else "   (once the app is installed: pip install -e .)"))
        return 0
    return importlib.import_module(app.module).main(
        ["--model", summary["model"], "--index", summary["index"], "--port", str(config.port)])


def main(argv: list[str] | None = None) -> int:
    return run_command("twist demo", build_parser(), DemoConfig, argv, demo)


if __name__ == "__main__":
    sys.exit(main())
