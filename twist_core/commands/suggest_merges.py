"""``twist suggest-merges INDEX``: rank cluster pairs to merge and estimate K (``twist_core.curate.merges``)."""

from __future__ import annotations

import argparse
import json
import sys

from twist_core.commands import run_command
from twist_core.config import command_parser
from twist_core.curate.merges import MergesConfig, draw_dendrogram, format_suggestions, run
from twist_core.curate.merges import __doc__ as DOC
from twist_core.io_utils import atomic_write_text
from twist_core.outputs import Output, check_outputs
from twist_core.report import print_written


def build_parser() -> argparse.ArgumentParser:
    return command_parser("twist suggest-merges", DOC, MergesConfig, positional=("source",))


def suggest_and_print(config: MergesConfig) -> int:
    check_outputs([Output("--json", config.json), Output("--plot", config.plot)],
                  inputs=[config.source, config.state_dir])
    result = run(config)
    if config.json:
        atomic_write_text(config.json, json.dumps({"source": str(config.source), **result.as_dict()}, indent=2) + "\n")
    if config.plot:
        draw_dendrogram(result, config.plot)
    print(format_suggestions(result, config.top))
    print_written([*([(config.json, "every pair's scores and the estimate of K")] if config.json else []),
                   *([(config.plot, "the dendrogram of the clusters")] if config.plot else [])])
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command("twist suggest-merges", build_parser(), MergesConfig, argv, suggest_and_print)


if __name__ == "__main__":
    sys.exit(main())
