"""``twist eval RUN_OR_MODEL DATA``: score the clusters against class folders (``twist_core.evaluation.evaluate``)."""

from __future__ import annotations

import argparse
import sys

from twist_core.commands import run_command
from twist_core.config import command_parser
from twist_core.errors import UserError
from twist_core.evaluation.evaluate import EvalConfig, confusion_path, evaluate, format_report
from twist_core.evaluation.evaluate import __doc__ as DOC
from twist_core.outputs import Output, check_outputs
from twist_core.report import print_written


def build_parser() -> argparse.ArgumentParser:
    return command_parser("twist eval", DOC, EvalConfig, positional=("source", "data"))


def evaluate_and_print(config: EvalConfig) -> int:
    if not config.source or not config.data:
        raise UserError("give RUN_OR_MODEL and DATA")
    check_outputs([Output("--json", config.json), Output("--confusion", confusion_path(config))],
                  inputs=[config.source], within=[config.data])
    report = evaluate(config)
    print(format_report(report))
    print_written([*([(config.json, "the full report (metrics, per-cluster table, baselines)")] if config.json else []),
                   *([(report["confusion_png"], "the confusion matrix")] if "confusion_png" in report else [])])
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command("twist eval", build_parser(), EvalConfig, argv, evaluate_and_print)


if __name__ == "__main__":
    sys.exit(main())
